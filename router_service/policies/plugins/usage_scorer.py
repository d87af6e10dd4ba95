"""Scorer ``kv_usage``: penalise a nearly full KV cache (admission waits, evictions follow).

Score = ``penalty_s`` x max(0, usage - watermark) / (1 - watermark): 0 below the watermark,
``penalty_s`` at 100 % usage.
"""

from __future__ import annotations

from router_service.policies.plugins.interfaces import Cycle


class UsageScorer:
    """Seconds charged above the usage watermark."""

    name = "kv_usage"

    def __init__(self, watermark: float, penalty_s: float) -> None:
        self.watermark = watermark
        self.penalty_s = penalty_s

    def scores(self, cycle: Cycle) -> list[float]:
        """Per node, in seconds."""
        wm, pen = self.watermark, self.penalty_s
        out = []
        for v in cycle.nodes:
            u = v.usage
            out.append(pen * (u - wm) / (1.0 - wm) if u > wm else 0.0)
        return out

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Stateless."""
