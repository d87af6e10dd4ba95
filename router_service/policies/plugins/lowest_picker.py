"""Picker ``lowest``: the lowest total score; ties to the longer overlap, then fewer in flight,
then the policy's ``tie_break`` (kv_aware: the prefill-only node that has computed the fewest
tokens), then a rotating start so equal idle nodes share work (the turn advances on commit).

**Replicas** (issue 19). Router replicas that decide at the same moment cannot see one another's
decisions, however fast the shared view is: with the same view of the fleet they all pick the
same best node, and a burst lands on it several times over (measured on the conversation
trace, whose 3-second ticks deliver up to 28 requests at one instant; 8 nodes, 4 replicas: the
busiest node of a 10+ burst got 4.4 of its requests against 3.1 with one router, p90 TTFT
4.40 -> 6.87 s). So when the request says ``replicas`` = R > 1 and a ``herd_cost`` is given,
the picker plays the R replicas' choices as one router would make them in turn — the best
node, then the best once that one carries ``herd_cost`` more, and so on — and takes the
choice at this replica's ``replica_rank``. Replicas seeing the same fleet so take R different
slots of one sequential plan instead of R copies of its first slot; a node that is far better
(a long cached prefix) stays every slot's choice. With one router nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router_service.policies.plugins.interfaces import Cycle

HerdCost = Callable[[Cycle, int], float]
"""(cycle, node index) -> what one more request like this one adds to that node's score."""
TIE_S = 1e-6
"""Prefill-only nodes' estimates (seconds) closer than this are equal: numerical resolution."""
TieBreak = Callable[[Cycle], Sequence[float]]
"""cycle -> per node, a value that breaks ties of score, overlap and in-flight before the
rotating start (lower first); computed once per pick (O(nodes))."""


class LowestScorePicker:
    """argmin of (score, -overlap, in-flight, tie-break, rotating position); with several
    replicas, this replica's slot of the sequential plan (module docstring)."""

    name = "lowest"

    def __init__(self, herd_cost: HerdCost | None = None,
                 tie_break: TieBreak | None = None) -> None:
        self._turn = 0
        self.herd_cost = herd_cost
        self.tie_break = tie_break

    def pick(self, cycle: Cycle, scores: Sequence[float], eligible: Sequence[int]) -> int:
        """Index of the chosen eligible node."""
        n = len(cycle.nodes)
        start = self._turn % n
        nodes, matched = cycle.nodes, cycle.matched
        req = cycle.request
        tb = self.tie_break
        tie = tb(cycle) if tb is not None else [0.0] * n
        if req.replicas <= 1 or self.herd_cost is None or len(eligible) < 2:
            chosen = min(eligible, key=lambda i: (scores[i], -matched[i], nodes[i].inflight,
                                                  tie[i], (i - start) % n))
            if tb is None or nodes[chosen].role != "prefill":
                return chosen
            # prefill-only nodes whose estimates differ by float residue (a drained queued-
            # prefill estimate is rarely exactly 0) are tied: the tie-break decides among them
            top = scores[chosen] + TIE_S
            return min((i for i in eligible if scores[i] <= top and nodes[i].role == "prefill"),
                       key=lambda i: (-matched[i], nodes[i].inflight, tie[i], (i - start) % n))
        added = [0.0] * n

        def best() -> int:
            return min(eligible, key=lambda i: (scores[i] + added[i], -matched[i],
                                                nodes[i].inflight, tie[i], (i - start) % n))

        chosen = best()
        for _ in range(req.replica_rank % req.replicas):
            added[chosen] += self.herd_cost(cycle, chosen)
            chosen = best()
        return chosen

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Advance the rotating start."""
        self._turn += 1
