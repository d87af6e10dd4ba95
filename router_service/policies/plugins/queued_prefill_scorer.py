"""Scorer ``queued_prefill``: seconds until this request's prefill would finish on the node.

    (pending_prefill_tokens + reuse_weight * uncached_tokens + inflight_cost_tokens * inflight)
    / prefill_tokens_per_s

``uncached_tokens`` is the prefill this request adds there: the prompt minus the effective
overlap (device-cache blocks, full credit) minus ``offloaded_credit`` x the offloaded blocks that
continue it (the engine loads those from CPU/disk instead of recomputing: cheaper than a prefill,
dearer than a GPU hit);
``pending_prefill_tokens`` is the router's estimate of prefill queued on the node, floored at
half the engine's reported waiting requests x this scorer's running average of uncached tokens
per decision (so an overestimated prefill rate cannot make a busy node look idle). The running
average moves on commit only.

On a **prefill-only** node (``role == "prefill"``, disaggregated fleets) with
``prefill_only_backlog`` on, the reuse weight grows by :meth:`QueuedPrefillScorer.backlog` (the
prefill-only candidates' mean in-flight requests) and no in-flight cost is charged: see the
``kv_aware`` module docstring.

A node whose agent reports its index incomplete (``index_complete`` False: late join, lost
batches, wrong topic) may hold more than the registry knows, so its missing prefix is not
evidence of a miss: the part of ``reuse_weight`` above 1 (the penalty for recomputing a prefix
that is cached elsewhere) is scaled by ``unknown_miss_weight`` there, while its own prefill time,
queued prefill and in-flight cost count in full.
"""

from __future__ import annotations

from router_service.policies.base import NodeView
from router_service.policies.plugins.interfaces import Cycle


class QueuedPrefillScorer:
    """Estimated prefill wait + own prefill, in seconds."""

    name = "queued_prefill"

    def __init__(self, prefill_tokens_per_s: float, reuse_weight: float,
                 inflight_cost_tokens: float, offloaded_credit: float = 1.0,
                 unknown_miss_weight: float = 1.0, prefill_only_backlog: bool = False,
                 even_inflow: bool = False, backlog_factor: float = 2.0) -> None:
        self.rate = prefill_tokens_per_s
        self.reuse_weight = reuse_weight
        self.inflight_cost_tokens = inflight_cost_tokens
        self.offloaded_credit = offloaded_credit
        self.unknown_miss_weight = unknown_miss_weight
        self.prefill_only_backlog = prefill_only_backlog
        self.backlog_factor = backlog_factor
        self.even_inflow = even_inflow
        self.avg_uncached = 0.0
        """Moving average of the uncached prompt tokens of committed decisions."""
        self._written: dict[str, float] = {}
        """Per prefill-only node: prompt tokens committed decisions had it compute (the new
        KV written into its cache), for :meth:`written_all`."""

    def backlog(self, cycle: Cycle) -> float:
        """``backlog_factor`` x the requests the prefill-only candidates hold in flight, per
        node (0 when there are none or ``prefill_only_backlog`` is off): on a prefill-only node
        every in-flight request is queued or running prefill, so by Little's law this is how
        many later requests will queue behind an uncached token computed now (module docstring
        of ``kv_aware``)."""
        if not self.prefill_only_backlog:
            return 0.0
        q = [v.inflight for v in cycle.nodes if v.role == "prefill"]
        return self.backlog_factor * sum(q) / len(q) if q else 0.0

    def score_one(self, cycle: Cycle, i: int, backlog: float = 0.0) -> float:
        """The score of ``cycle.nodes[i]``; ``backlog`` (:meth:`backlog`) raises the reuse weight
        of a prefill-only node, whose in-flight requests are not charged (they are its queued
        prefill, already counted; nothing decodes there)."""
        req = cycle.request
        v = cycle.nodes[i]
        w = self.reuse_weight
        if self.prefill_only_backlog and v.role == "prefill":
            w += backlog
        if not v.index_complete:
            w = min(w, 1.0 + (w - 1.0) * self.unknown_miss_weight)
        uncached = req.prompt_tokens - self.credited_tokens(cycle, i)
        pending = max(v.pending_prefill_tokens, 0.5 * v.queue_depth * self.avg_uncached)
        return (pending + w * uncached + self.inflight_cost_of(v) * v.inflight) / self.rate_of(v)

    def inflight_cost_of(self, v: NodeView) -> float:
        """Prefill-token equivalents charged per request in flight on ``v``: none on a
        prefill-only node when ``prefill_only_backlog`` is on (its in-flight requests are its
        queued prefill, counted already; nothing decodes there)."""
        if self.prefill_only_backlog and v.role == "prefill":
            return 0.0
        return self.inflight_cost_tokens

    def rate_of(self, v: NodeView) -> float:
        """Node ``v``'s prefill rate in tokens/s: its calibrated one, else the default."""
        return v.prefill_tokens_per_s or self.rate

    def offloaded_tokens(self, cycle: Cycle, i: int) -> int:
        """Prompt tokens of ``cycle.nodes[i]``'s offloaded blocks beyond the effective overlap."""
        req = cycle.request
        v = cycle.nodes[i]
        if not v.offloaded_blocks:
            return 0
        m = cycle.matched[i]
        extra = max(0, v.matched_blocks + v.offloaded_blocks - m)
        return max(0, min(extra * req.block_size, req.prompt_tokens - m * req.block_size))

    def credited_tokens(self, cycle: Cycle, i: int) -> float:
        """Device-cached tokens plus ``offloaded_credit`` x offloaded tokens, for node i."""
        req = cycle.request
        cached = min(cycle.matched[i] * req.block_size, req.prompt_tokens)
        return cached + self.offloaded_credit * self.offloaded_tokens(cycle, i)

    def scores(self, cycle: Cycle) -> list[float]:
        """Per node, in seconds."""
        backlog = self.backlog(cycle)
        return [self.score_one(cycle, i, backlog) for i in range(len(cycle.nodes))]

    def written_all(self, cycle: Cycle) -> list[float]:
        """Per node of the cycle, the tokens committed decisions had that prefill-only node
        compute (0 for other roles, or with ``even_inflow`` off): kv_aware's tie-break between
        equal estimates. A node first seen after the others starts level with the least of them
        (as a new task's virtual runtime does in Linux's CFS), so a joining node shares ties
        instead of taking every one until it has caught up with the fleet's lifetime. One pass
        (the floor computed once)."""
        nodes = cycle.nodes
        if not self.even_inflow or not any(v.role == "prefill" for v in nodes):
            return [0.0] * len(nodes)
        floor = self._floor(cycle)
        w = self._written
        return [w.get(v.node_id, floor) if v.role == "prefill" else 0.0 for v in nodes]

    def _floor(self, cycle: Cycle) -> float:
        known = [self._written[v.node_id] for v in cycle.nodes
                 if v.role == "prefill" and v.node_id in self._written]
        return min(known, default=0.0)

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Fold the chosen node's uncached tokens into the running average (and, for a
        prefill-only node, into what it has computed)."""
        uncached = cycle.request.prompt_tokens - self.credited_tokens(cycle, chosen)
        self.avg_uncached += 0.02 * (uncached - self.avg_uncached)
        v = cycle.nodes[chosen]
        if self.even_inflow and v.role == "prefill":
            w = self._written
            floor = self._floor(cycle)
            for n in cycle.nodes:  # first seen: level with the least known (0 at the start)
                if n.role == "prefill" and n.node_id not in w:
                    w[n.node_id] = floor
            w[v.node_id] += max(0.0, uncached)
            if len(w) > 4 * len(cycle.nodes) + 64:  # departed nodes: keep the cycle's own
                here = {n.node_id for n in cycle.nodes}
                for nid in [k for k in w if k not in here]:
                    del w[nid]
