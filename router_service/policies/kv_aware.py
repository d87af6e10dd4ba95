"""``kv_aware``: maximise saved prefill while keeping load even (DESIGN §5).

The quantity users feel is time to first token, so benefit and cost are in the same unit: the
estimated TTFT of the request on each node, in seconds,

    est(n) = (pending_prefill_tokens(n) + reuse_weight * uncached_tokens(n)
              + inflight_cost_tokens * inflight(n)) / prefill_rate
             + eviction_cost_s * eviction_rate(n)
             + usage_penalty_s * max(0, usage(n) - watermark) / (1 - watermark)

where ``uncached_tokens(n) = prompt_tokens - matched_blocks(n) * block_size
- weight_offloaded * offloaded_tokens(n)`` is the prefill this request adds on that node (its
overlap benefit is the prefill it saves there), and
``pending_prefill_tokens`` is the router's estimate of prefill already queued on the node (floored
at half the engine's reported waiting requests x the policy's running average of uncached tokens
per request, so an overestimated prefill rate cannot make a busy node look idle).
Between two nodes the ``reuse_weight`` term differs by ``reuse_weight`` x the cached tokens the
request would recompute on the worse one: > 1 because recomputing a cached prefix elsewhere also
delays every later request on that node and duplicates cache that then evicts other prefixes
(measured with ``kvroute bench`` on the Mooncake conversation trace, 8 nodes: weight 1 serves
0.31 of prompt tokens from cache against a 0.36 merged-capacity LRU bound; 8, the default,
serves 0.354 and matches the cache-first routers, for about 0.3 s more p90 TTFT than weight 1 —
still well below every peer). ``inflight_cost_tokens`` charges each request in flight on the
node (decode batch occupancy, which slows the next prefill), which also keeps request counts even.

The overlap is the larger of the registry's ``matched_blocks`` and what this policy itself sent to
the node among its recent decisions (at least ``recent_routes``, and twice the fleet's in-flight
count): a follow-up request whose prefix was routed moments ago but is still queued for prefill
(so not yet in any cache or the registry) then follows it instead of being scattered — measured
on an overloaded fleet this kept the hit rate at the cache-first routers' level (0.17 vs 0.12).

**Prefill-only nodes** (disaggregated fleets, ``role`` prefill): nothing decodes there, so a
node's in-flight requests are exactly its prefill queue, and their cache is the only thing that
saves prefill compute. Waiting behind a queue costs this request alone; a recomputed token costs
its own prefill *and* delays every request that queues behind it, and by Little's law about as
many requests will join behind it during its stay as are in flight now. So on these nodes
(``kv_prefill_only_backlog``, default on) the reuse weight is ``kv_reuse_weight`` +
``kv_prefill_only_backlog_factor`` (default 2) x the prefill nodes' mean in-flight count (the
load-balanced prefill nodes behave as one pooled queue: the delay spreads over the fleet; a
factor of 1 counts only the requests in flight now, while on a saturated pool a recomputed token
also delays those that arrive before the queue drains — 2 is measured, not derived: on the
saturated Mooncake sample, 90 seeded sims, hit +0.0006 and p90 -0.1 s against 1; conversations
and system prompts unchanged, the full trace hit +0.0012 at p90 +0.5 %; README, "vllm-router's
PD mode, read from its source"), no ``inflight_cost_tokens`` is charged (it stands for decode
occupancy) and the request-count load cap does not apply (``kv_prefill_only_load_cap``, default
off: the queue is priced in seconds, which already stops a shared prefix from piling onto one
node). At an idle fleet the weight is ``kv_reuse_weight`` as before; when the prefill nodes are
saturated (the Mooncake sample on 6 prefill + 2 decode: about 5 in flight each) it is about 18,
and hits matter as much as the capacity they save. Measured in the README ("Disaggregated
prefill/decode", s25-i13). Ties between prefill-only nodes (equal estimate, overlap and
in-flight: typically idle nodes and a prompt none holds) go to the node that has computed the
fewest tokens so far instead of in turn (``kv_prefill_only_even_inflow``): where a prompt's new
KV is written only decides which cache it evicts from, and filling every prefill cache at one
pace keeps each conversation's history equally long (sglang-router's cache_aware sends such
prompts to its smallest tree for the same reason). A node first seen later starts level with the
least of the others. Aggregated (``both``) nodes are scored as before.

**Offloaded blocks** (a lower tier: vLLM's offloading connector ``medium`` CPU, SGLang HiCache
CPU_PINNED / DISK) continue a node's device prefix: after its GPU-resident run, the blocks the
engine holds on the offloading medium (the walk stops at the first block that medium lacks; see
:mod:`kvroute.index.base`). The engine loads them instead of recomputing, which is faster than a
prefill but slower than a GPU hit, so they earn ``kv_weight_offloaded`` (default 0.75) of a GPU
block's credit. For reference, llm-d-kv-cache's default medium weights are gpu 1.0 / cpu 0.8 and
Dynamo's router credits host-pinned blocks about 0.75 and disk about 0.25 of a device block;
kvroute's agent reports one lower tier for every offloading medium, so a fleet offloading to disk
should lower the weight. Offloaded tokens never count in the decision's
``expected_cached_tokens`` (device hits only); they are reported apart
(``expected_offloaded_tokens``).

**Incomplete indexes**: a node whose agent says it cannot know the engine's state
(``index_state`` partial or no_events: late join, lost batches, a wrong topic) may hold more
than the registry knows, so a prefix missing there is not evidence of a miss. The part of
``kv_reuse_weight`` above 1 (the penalty for recomputing a prefix cached elsewhere) is scaled by
``kv_weight_unknown_index_miss`` (default 0.75) for such a node; its own prefill time, queued
prefill, in-flight and usage costs count in full. At equal load it then beats a node known to
miss (8 x prompt against 6.25 x prompt at the defaults) and loses to a node known to hold more
than about a fifth of the prompt (8 x uncached < 6.25 x prompt): the unknown node may hold the
prefix, an idle engine without replay may hold nothing, so it gets the benefit of the doubt
only against a certain miss or a small hit.

A node is eligible only while it is under the **load cap**: its in-flight count plus this request
must stay <= ``load_cap_factor`` x the fleet's mean in-flight count (counting this request) +
``load_cap_slack``. A prefix every request shares (block 0 of the Mooncake trace is in all of
them) therefore cannot pile everything onto one node: that node leaves the eligible set as soon
as it is ahead, and the next-best estimate wins. Unhealthy nodes are never chosen.

The policy picks the lowest estimate; ties go to the longer match, then fewer in-flight, then
(prefill-only nodes) fewer tokens computed, then a rotating start so equal idle nodes share
work. ``Candidate.score`` is the estimate in seconds
(lower is better).

Built from plugins (:mod:`router_service.policies.plugins`): overlap source ``recent_routes``;
filters ``health`` and ``load_cap``; scorers ``queued_prefill`` (the first line of ``est``),
``eviction`` and ``kv_usage`` (the other two), each with a weight (``--kv-weight-*``, default 1);
picker ``lowest``. State (recent routes, the running average, tokens computed per prefill-only
node, the rotating start) changes on
commit only. With several router replicas sharing their view (issue 19), the picker gives each
replica its own slot of the plan one router would make for the replicas' simultaneous requests
(``kv_replica_spread``; :mod:`~router_service.policies.plugins.lowest_picker`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.settings import require, setting
from router_service.policies.plugins.eviction_scorer import EvictionScorer
from router_service.policies.plugins.health_filter import HealthFilter
from router_service.policies.plugins.interfaces import Cycle
from router_service.policies.plugins.load_cap_filter import LoadCapFilter
from router_service.policies.plugins.lowest_picker import LowestScorePicker
from router_service.policies.plugins.queued_prefill_scorer import QueuedPrefillScorer
from router_service.policies.plugins.recent_routes import RecentRoutes
from router_service.policies.plugins.scheduler import SchedulingPolicy
from router_service.policies.plugins.usage_scorer import UsageScorer


@dataclass(frozen=True)
class KvAwareSettings:
    """Weights and cap of the ``kv_aware`` policy (flags ``--kv-*``, env ``KVROUTE_KV_*``)."""

    kv_prefill_tokens_per_s: float = setting(
        16_000.0, "prefill throughput of one engine in tokens/s (set it from your engines; "
        "when unsure err low): converts queued and uncached prefill into seconds of expected "
        "TTFT and drains the router's queued-prefill estimate. Measured: 2x too low costs "
        "little, 2.7x too high raises p90 TTFT by about a quarter")
    kv_reuse_weight: float = setting(
        8.0, "weight of this request's uncached prefill against work already queued; >1 prefers "
        "nodes that hold the prefix (recomputing it elsewhere also delays later requests there "
        "and duplicates cache)")
    kv_load_cap_factor: float = setting(
        1.25, "a node is eligible only while its in-flight requests (with this one) stay <= this "
              "factor x the fleet mean (with this one) + kv_load_cap_slack")
    kv_load_cap_slack: float = setting(
        5.0, "absolute headroom of the load cap, in requests (keeps tiny fleets from "
             "oscillating)")
    kv_inflight_cost_tokens: float = setting(
        1000.0, "prefill-token equivalents charged per request in flight on the node (decode "
               "batch occupancy slows the next prefill; also evens out request counts)")
    kv_recent_routes: int = setting(
        64, "remember at least this many recent decisions (and twice the fleet's in-flight "
            "count) so a follow-up request whose prefix is routed but not yet prefilled, hence "
            "not yet in the registry, still finds its node; 0 = off")
    kv_eviction_cost_s: float = setting(
        0.001, "seconds added per eviction/s reported by the node (a churning cache is likely "
               "to lose the prefix before the request runs)")
    kv_usage_high_watermark: float = setting(
        0.97, "KV usage fraction above which a node is penalised as nearly full")
    kv_usage_penalty_s: float = setting(
        0.5, "seconds added to a node at 100 % KV usage (linear from the watermark)")
    kv_replica_spread: float = setting(
        1.0, "with N router replicas deciding side by side (shared view live, N > 1), each "
             "takes its own slot (by sorted replica id) of the plan one router would make for N "
             "such requests, charging a chosen node this factor x the request's prefill and "
             "in-flight cost per step, so replicas deciding the same instant do not herd onto "
             "one node; 0 = every replica takes the best node. No effect with one router")
    kv_weight_queued_prefill: float = setting(
        1.0, "weight of the queued_prefill scorer (estimated prefill wait + own prefill, s)")
    kv_weight_eviction: float = setting(
        1.0, "weight of the eviction scorer (kv_eviction_cost_s x evictions/s)")
    kv_weight_kv_usage: float = setting(
        1.0, "weight of the kv_usage scorer (penalty above kv_usage_high_watermark)")
    kv_weight_offloaded: float = setting(
        0.75, "credit of a block the node holds on an offloading medium (CPU, CPU_PINNED, "
              "DISK: loaded back instead of recomputed) relative to a GPU-resident block: "
              "1 = as good as a GPU hit, 0 = ignored. Lower it when the offload tier is disk")
    kv_weight_unknown_index_miss: float = setting(
        0.75, "for a node whose agent reports its index incomplete (index_state partial or "
             "no_events), how much of the prefix-miss penalty (kv_reuse_weight above 1) "
             "applies: 1 = trust its index as complete, 0 = charge only its prefill time; "
             "its load always counts in full")

    kv_prefill_only_backlog: bool = setting(
        True, "on prefill-only nodes (disaggregated fleets) add the prefill nodes' mean "
              "in-flight requests to the reuse weight (a token recomputed there also delays "
              "the requests that will queue behind it: by Little's law about as many as are "
              "in flight now) and charge no in-flight cost (nothing decodes there: their "
              "in-flight requests are their queued prefill, already counted in seconds). "
              "--no-kv-prefill-only-backlog: score them as aggregated nodes")
    kv_prefill_only_backlog_factor: float = setting(
        2.0, "with kv_prefill_only_backlog: multiply the prefill nodes' mean in-flight count "
             "by this before adding it to the reuse weight of prefill-only nodes (1 = Little's "
             "law over the requests in flight now; a saturated pool also delays those arriving "
             "before it drains: 2 measured best on the saturated Mooncake sample, neutral "
             "where prefill queues are short; 0 = the reuse weight alone)")
    kv_prefill_only_even_inflow: bool = setting(
        True, "break ties between prefill-only nodes (equal estimate, overlap and in-flight: "
              "typically idle nodes and a prompt none of them holds) towards the node that has "
              "computed the fewest tokens, instead of in turn: new KV then fills every prefill "
              "cache at the same pace, so each keeps conversations equally long")
    kv_prefill_only_load_cap: bool = setting(
        False, "apply the in-flight load cap to prefill-only nodes too (off by default: a "
               "request count stands for decode occupancy, which they do not have; their "
               "queue is priced in seconds, which already stops a shared prefix from piling "
               "everything onto one node)")

    def __post_init__(self) -> None:
        require(self.kv_prefill_tokens_per_s > 0, "kv_prefill_tokens_per_s", "must be > 0")
        require(self.kv_reuse_weight >= 0, "kv_reuse_weight", "must be >= 0")
        require(self.kv_load_cap_factor >= 1.0, "kv_load_cap_factor", "must be >= 1")
        require(self.kv_load_cap_slack >= 0, "kv_load_cap_slack", "must be >= 0")
        require(self.kv_inflight_cost_tokens >= 0, "kv_inflight_cost_tokens", "must be >= 0")
        require(self.kv_recent_routes >= 0, "kv_recent_routes", "must be >= 0")
        require(self.kv_eviction_cost_s >= 0, "kv_eviction_cost_s", "must be >= 0")
        require(0 < self.kv_usage_high_watermark < 1, "kv_usage_high_watermark",
                "must be in (0, 1)")
        require(self.kv_usage_penalty_s >= 0, "kv_usage_penalty_s", "must be >= 0")
        require(self.kv_replica_spread >= 0, "kv_replica_spread", "must be >= 0")
        require(self.kv_prefill_only_backlog_factor >= 0, "kv_prefill_only_backlog_factor",
                "must be >= 0")
        for name in ("kv_weight_queued_prefill", "kv_weight_eviction", "kv_weight_kv_usage"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("kv_weight_offloaded", "kv_weight_unknown_index_miss"):
            require(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")


class KvAwarePolicy(SchedulingPolicy):
    """Lowest estimated TTFT among nodes under the load cap (see module docstring)."""

    def __init__(self, settings: KvAwareSettings | None = None) -> None:
        s = self.settings = settings or KvAwareSettings()
        self.prefill = QueuedPrefillScorer(s.kv_prefill_tokens_per_s, s.kv_reuse_weight,
                                           s.kv_inflight_cost_tokens, s.kv_weight_offloaded,
                                           s.kv_weight_unknown_index_miss,
                                           s.kv_prefill_only_backlog,
                                           s.kv_prefill_only_even_inflow,
                                           s.kv_prefill_only_backlog_factor)
        self.load_cap = LoadCapFilter(s.kv_load_cap_factor, s.kv_load_cap_slack,
                                      not s.kv_prefill_only_load_cap)
        super().__init__(
            "kv_aware", RecentRoutes(s.kv_recent_routes), [HealthFilter(), self.load_cap],
            [(self.prefill, s.kv_weight_queued_prefill),
             (EvictionScorer(s.kv_eviction_cost_s), s.kv_weight_eviction),
             (UsageScorer(s.kv_usage_high_watermark, s.kv_usage_penalty_s),
              s.kv_weight_kv_usage)],
            LowestScorePicker(self.herd_cost if s.kv_replica_spread > 0 else None,
                              self.prefill.written_all if s.kv_prefill_only_even_inflow else None))

    def herd_cost(self, cycle: Cycle, i: int) -> float:
        """What one more request like this one would add to node ``i``'s estimate (its
        uncached prefill and in-flight charge there, in seconds) x kv_replica_spread: the step
        of the replicas' sequential plan (:mod:`~router_service.policies.plugins.lowest_picker`)."""
        p = self.prefill
        uncached = cycle.request.prompt_tokens - p.credited_tokens(cycle, i)
        return (self.settings.kv_replica_spread
                * (uncached + p.inflight_cost_of(cycle.nodes[i])) / p.rate_of(cycle.nodes[i]))

    def reason(self, cycle: Cycle, chosen: int, score: float) -> str:
        """Cached prefix, what was routed there but not reported yet, estimate, load and cap."""
        req = cycle.request
        v = cycle.nodes[chosen]
        cached = min(v.matched_blocks * req.block_size, req.prompt_tokens)
        routed = cycle.matched[chosen] - v.matched_blocks
        extra = f" (+{routed} routed there, not yet reported)" if routed > 0 else ""
        off = self.prefill.offloaded_tokens(cycle, chosen)
        if off:
            extra += f" + {off} tokens offloaded (CPU/disk)"
        if not v.index_complete:
            extra += " [node's index incomplete: its misses are not trusted]"
        if self.prefill.prefill_only_backlog and v.role == "prefill":
            w = self.settings.kv_reuse_weight + self.prefill.backlog(cycle)
            extra += f" [prefill-only: reuse weight {w:.1f} with the prefill backlog]"
        slot = (f", slot {req.replica_rank + 1} of {req.replicas} replicas"
                if req.replicas > 1 and self.settings.kv_replica_spread > 0 else "")
        cap = ("no cap: prefill-only" if self.load_cap.spare_prefill_only
               and v.role == "prefill" else f"cap {self.load_cap.cap(cycle):.1f}")
        return (f"kv_aware: {v.matched_blocks} prefix blocks cached{extra} "
                f"({cached}/{req.prompt_tokens} tokens), est. TTFT {score * 1000:.0f} ms, "
                f"in-flight {v.inflight} ({cap}){slot}")
