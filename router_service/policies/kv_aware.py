"""``kv_aware``: maximise saved prefill while keeping load even (DESIGN §5).

The quantity users feel is time to first token, so benefit and cost are in the same unit: the
estimated TTFT of the request on each node, in seconds,

    est(n) = (pending_prefill_tokens(n) + reuse_weight * uncached_tokens(n)
              + inflight_cost_tokens * inflight(n)) / prefill_rate
             + eviction_cost_s * eviction_rate(n)
             + usage_penalty_s * max(0, usage(n) - watermark) / (1 - watermark)

where ``uncached_tokens(n) = prompt_tokens - matched_blocks(n) * block_size`` is the prefill this
request adds on that node (its overlap benefit is the prefill it saves there), and
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

A node is eligible only while it is under the **load cap**: its in-flight count plus this request
must stay <= ``load_cap_factor`` x the fleet's mean in-flight count (counting this request) +
``load_cap_slack``. A prefix every request shares (block 0 of the Mooncake trace is in all of
them) therefore cannot pile everything onto one node: that node leaves the eligible set as soon
as it is ahead, and the next-best estimate wins. Unhealthy nodes are never chosen.

The policy picks the lowest estimate; ties go to the longer match, then fewer in-flight, then a
rotating start so equal idle nodes share work. ``Candidate.score`` is the estimate in seconds
(lower is better).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kvroute.settings import require, setting
from router_service.policies.base import (
    Candidate,
    Decision,
    NodeView,
    RequestView,
    healthy_nodes,
)


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


class RecentRoutes:
    """Which node the latest recent request carrying each block went to (bounded memory).

    Covers the gap between routing a request and its blocks reaching the registry (queued
    prefill, heartbeat interval): a prefix sent to a node moments ago is on its way there.
    """

    def __init__(self) -> None:
        self._seq = 0
        self._owner: dict[int, tuple[str, int]] = {}
        self._log: deque[tuple[int, Sequence[int]]] = deque()

    def record(self, blocks: Sequence[int], node_id: str, window: int) -> None:
        """Remember that ``blocks`` went to ``node_id``; forget decisions older than window."""
        self._seq += 1
        seq = self._seq
        for h in blocks:
            self._owner[h] = (node_id, seq)
        self._log.append((seq, blocks))
        limit = seq - window
        owner = self._owner
        while self._log and self._log[0][0] <= limit:
            old_seq, old_blocks = self._log.popleft()
            for h in old_blocks:
                cur = owner.get(h)
                if cur is not None and cur[1] == old_seq:
                    del owner[h]

    def depths(self, blocks: Sequence[int]) -> dict[str, int]:
        """Per node: leading blocks of ``blocks`` recently routed there."""
        out: dict[str, int] = {}
        owner = self._owner
        for i, h in enumerate(blocks):
            cur = owner.get(h)
            if cur is None:
                break
            out[cur[0]] = i + 1
        return out


class KvAwarePolicy:
    """Lowest estimated TTFT among nodes under the load cap (see module docstring)."""

    name = "kv_aware"

    def __init__(self, settings: KvAwareSettings | None = None) -> None:
        self.settings = settings or KvAwareSettings()
        self._turn = 0
        self._recent = RecentRoutes()
        self._avg_uncached = 0.0
        """Moving average of the uncached prompt tokens of this policy's decisions."""

    def estimate_s(self, request: RequestView, node: NodeView,
                   reuse_weight: float | None = None, matched_blocks: int | None = None) -> float:
        """Estimated TTFT of ``request`` on ``node`` in seconds (the score; lower is better).

        ``matched_blocks`` overrides the registry's overlap (kv_aware passes the larger of it
        and what it recently routed to the node).
        """
        s = self.settings
        w = s.kv_reuse_weight if reuse_weight is None else reuse_weight
        matched = node.matched_blocks if matched_blocks is None else matched_blocks
        cached = min(matched * request.block_size, request.prompt_tokens)
        uncached = request.prompt_tokens - cached
        # the engine's reported waiting requests x a typical request's prefill: a floor under
        # the router's drain-rate estimate, which runs dry early if the configured rate is high
        pending = max(node.pending_prefill_tokens, 0.5 * node.queue_depth * self._avg_uncached)
        est = (pending + w * uncached
               + s.kv_inflight_cost_tokens * node.inflight) / s.kv_prefill_tokens_per_s
        est += s.kv_eviction_cost_s * node.eviction_rate
        usage = node.usage
        if usage > s.kv_usage_high_watermark:
            est += s.kv_usage_penalty_s * (usage - s.kv_usage_high_watermark) \
                / (1.0 - s.kv_usage_high_watermark)
        return est

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """Pick the node with the lowest TTFT estimate among those under the load cap."""
        s = self.settings
        live = healthy_nodes(nodes)
        n = len(live)
        total = sum(v.inflight for v in live)
        mean = (total + 1) / n
        cap = s.kv_load_cap_factor * mean + s.kv_load_cap_slack
        w = s.kv_reuse_weight
        recent = self._recent.depths(request.block_hashes) if s.kv_recent_routes else {}
        start = self._turn % n
        self._turn += 1
        best: tuple[float, int, int, int] | None = None
        best_node = live[0]
        best_est = 0.0
        best_matched = 0
        cands: list[Candidate] = []
        for i, v in enumerate(live):
            matched = max(v.matched_blocks, recent.get(v.node_id, 0))
            est = self.estimate_s(request, v, w, matched)
            over = v.inflight + 1 > cap
            why = f"in-flight {v.inflight} over cap {cap:.1f}" if over else ""
            cands.append(Candidate(v.node_id, est, v.matched_blocks, v.load, excluded=why))
            if over:
                continue
            key = (est, -matched, v.inflight, (i - start) % n)
            if best is None or key < best:
                best, best_node, best_est, best_matched = key, v, est, matched
        if best is None:  # cannot happen (the least-loaded node is under the mean), but be safe
            best_node = min(live, key=lambda v: (v.load, v.node_id))
            best_matched = best_node.matched_blocks
            best_est = self.estimate_s(request, best_node, w)
        uncached_best = request.prompt_tokens - min(best_matched * request.block_size,
                                                    request.prompt_tokens)
        self._avg_uncached += 0.02 * (uncached_best - self._avg_uncached)
        if s.kv_recent_routes:
            self._recent.record(request.block_hashes, best_node.node_id,
                                max(s.kv_recent_routes, 2 * total))
        cands.sort(key=lambda c: (c.excluded != "", c.score))
        cached = min(best_node.matched_blocks * request.block_size, request.prompt_tokens)
        routed = best_matched - best_node.matched_blocks
        extra = f" (+{routed} routed there, not yet reported)" if routed > 0 else ""
        reason = (f"kv_aware: {best_node.matched_blocks} prefix blocks cached{extra} "
                  f"({cached}/{request.prompt_tokens} tokens), est. TTFT "
                  f"{best_est * 1000:.0f} ms, in-flight {best_node.inflight} (cap {cap:.1f})")
        return Decision(best_node.node_id, best_node.matched_blocks, reason, tuple(cands))
