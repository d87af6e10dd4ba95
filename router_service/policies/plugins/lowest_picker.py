"""Picker ``lowest``: the lowest total score; ties to the longer overlap, then fewer in flight,
then a rotating start so equal idle nodes share work (the turn advances on commit)."""

from __future__ import annotations

from collections.abc import Sequence

from router_service.policies.plugins.interfaces import Cycle


class LowestScorePicker:
    """argmin of (score, -overlap, in-flight, rotating position)."""

    name = "lowest"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, cycle: Cycle, scores: Sequence[float], eligible: Sequence[int]) -> int:
        """Index of the best eligible node."""
        n = len(cycle.nodes)
        start = self._turn % n
        nodes, matched = cycle.nodes, cycle.matched
        return min(eligible, key=lambda i: (scores[i], -matched[i], nodes[i].inflight,
                                            (i - start) % n))

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Advance the rotating start."""
        self._turn += 1
