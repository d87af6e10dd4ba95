"""Scorer ``eviction``: a churning cache is likely to lose the prefix before the request runs.

Score = ``cost_s`` x the node's reported evictions per second.
"""

from __future__ import annotations

from router_service.policies.plugins.interfaces import Cycle


class EvictionScorer:
    """Seconds charged per eviction/s."""

    name = "eviction"

    def __init__(self, cost_s: float) -> None:
        self.cost_s = cost_s

    def scores(self, cycle: Cycle) -> list[float]:
        """Per node, in seconds."""
        c = self.cost_s
        return [c * v.eviction_rate for v in cycle.nodes]

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Stateless."""
