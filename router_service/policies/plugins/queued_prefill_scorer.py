"""Scorer ``queued_prefill``: seconds until this request's prefill would finish on the node.

    (pending_prefill_tokens + reuse_weight * uncached_tokens + inflight_cost_tokens * inflight)
    / prefill_tokens_per_s

``uncached_tokens`` is the prefill this request adds there (prompt minus the effective overlap);
``pending_prefill_tokens`` is the router's estimate of prefill queued on the node, floored at
half the engine's reported waiting requests x this scorer's running average of uncached tokens
per decision (so an overestimated prefill rate cannot make a busy node look idle). The running
average moves on commit only.
"""

from __future__ import annotations

from router_service.policies.plugins.interfaces import Cycle


class QueuedPrefillScorer:
    """Estimated prefill wait + own prefill, in seconds."""

    name = "queued_prefill"

    def __init__(self, prefill_tokens_per_s: float, reuse_weight: float,
                 inflight_cost_tokens: float) -> None:
        self.rate = prefill_tokens_per_s
        self.reuse_weight = reuse_weight
        self.inflight_cost_tokens = inflight_cost_tokens
        self.avg_uncached = 0.0
        """Moving average of the uncached prompt tokens of committed decisions."""

    def score_one(self, cycle: Cycle, i: int, reuse_weight: float | None = None) -> float:
        """The score of ``cycle.nodes[i]`` (optionally with another reuse weight)."""
        req = cycle.request
        v = cycle.nodes[i]
        w = self.reuse_weight if reuse_weight is None else reuse_weight
        cached = min(cycle.matched[i] * req.block_size, req.prompt_tokens)
        uncached = req.prompt_tokens - cached
        pending = max(v.pending_prefill_tokens, 0.5 * v.queue_depth * self.avg_uncached)
        rate = v.prefill_tokens_per_s or self.rate
        return (pending + w * uncached + self.inflight_cost_tokens * v.inflight) / rate

    def scores(self, cycle: Cycle) -> list[float]:
        """Per node, in seconds."""
        return [self.score_one(cycle, i) for i in range(len(cycle.nodes))]

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Fold the chosen node's uncached tokens into the running average."""
        req = cycle.request
        uncached = req.prompt_tokens - min(cycle.matched[chosen] * req.block_size,
                                           req.prompt_tokens)
        self.avg_uncached += 0.02 * (uncached - self.avg_uncached)
