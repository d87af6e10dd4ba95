"""A policy composed of plugins: overlap source -> filters -> weighted scorers -> picker.

:meth:`SchedulingPolicy.choose` only computes (the cycle is kept for :meth:`commit`);
:meth:`SchedulingPolicy.commit` hands the chosen node to every plugin so they update their state.
"""

from __future__ import annotations

from collections.abc import Sequence

from router_service.policies.base import (
    Candidate,
    Decision,
    NodeView,
    RequestView,
    healthy_nodes,
)
from router_service.policies.plugins.interfaces import (
    Cycle,
    Filter,
    OverlapSource,
    Picker,
    RemoteObserver,
    Scorer,
)


class SchedulingPolicy:
    """Filters, weighted scorers and a picker over the healthy nodes (module docstring)."""

    narrowable = True
    """Decides as well among the best-matching and least-loaded nodes as among all of them, so
    the core may narrow a large fleet's candidates (:mod:`router_service.narrowing`)."""

    def __init__(self, name: str, overlap: OverlapSource | None, filters: Sequence[Filter],
                 scorers: Sequence[tuple[Scorer, float]], picker: Picker) -> None:
        self.name = name
        self.overlap = overlap
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker
        self._last: tuple[str, Cycle, int] | None = None

    def cycle(self, request: RequestView, nodes: Sequence[NodeView]) -> Cycle:
        """The cycle's inputs: healthy nodes and their effective overlap."""
        live = healthy_nodes(nodes)
        matched = (self.overlap.overlap(request, live) if self.overlap is not None
                   else [v.matched_blocks for v in live])
        if request.fleet_nodes:  # the core narrowed the candidates: fleet-wide load figures
            return Cycle(request, live, matched, request.fleet_inflight, request.fleet_nodes)
        return Cycle(request, live, matched, sum(v.inflight for v in live))

    def total_scores(self, cycle: Cycle) -> list[float]:
        """Weighted sum of every scorer's scores, per node."""
        total = [0.0] * len(cycle.nodes)
        for scorer, weight in self.scorers:
            for i, x in enumerate(scorer.scores(cycle)):
                total[i] += weight * x
        return total

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """Filter, score and pick (no state changes)."""
        cycle = self.cycle(request, nodes)
        excl = [""] * len(cycle.nodes)
        for f in self.filters:
            for i, why in enumerate(f.exclusions(cycle)):
                if why and not excl[i]:
                    excl[i] = why
        scores = self.total_scores(cycle)
        eligible = [i for i, why in enumerate(excl) if not why]
        if eligible:
            chosen = self.picker.pick(cycle, scores, eligible)
        else:  # filters must leave a node; if one ever does not, fall back to the least loaded
            chosen = min(range(len(cycle.nodes)),
                         key=lambda i: (cycle.nodes[i].load, cycle.nodes[i].node_id))
        self._last = (request.request_id, cycle, chosen)
        cands = sorted((Candidate(v.node_id, scores[i], v.matched_blocks, v.load,
                                  excluded=excl[i], offloaded_blocks=v.offloaded_blocks)
                        for i, v in enumerate(cycle.nodes)),
                       key=lambda c: (c.excluded != "", c.score))
        node = cycle.nodes[chosen]
        return Decision(node.node_id, node.matched_blocks,
                        self.reason(cycle, chosen, scores[chosen]), tuple(cands))

    def reason(self, cycle: Cycle, chosen: int, score: float) -> str:
        """Why, for operators (policies override)."""
        v = cycle.nodes[chosen]
        return f"{self.name}: score {score:.4g}, {cycle.matched[chosen]} prefix blocks, " \
               f"in-flight {v.inflight}"

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Tell every plugin which node the router acted on."""
        last = self._last
        self._last = None
        if last is None or last[0] != request.request_id:
            return  # not the decision this policy just computed: nothing to learn
        _, cycle, chosen = last
        if cycle.nodes[chosen].node_id != decision.node_id:
            chosen = next((i for i, v in enumerate(cycle.nodes)
                           if v.node_id == decision.node_id), chosen)
        if self.overlap is not None:
            self.overlap.commit(cycle, chosen)
        for f in self.filters:
            f.commit(cycle, chosen)
        for scorer, _ in self.scorers:
            scorer.commit(cycle, chosen)
        self.picker.commit(cycle, chosen)

    def observe_remote(self, blocks: Sequence[int], node_id: str) -> None:
        """Another router replica routed ``blocks`` to ``node_id`` (shared view, issue 19):
        plugins that keep routing state and can learn from it (``observe_remote``) do."""
        plugins: list[object] = [self.overlap, *self.filters,
                                 *(s for s, _ in self.scorers), self.picker]
        for p in plugins:
            if isinstance(p, RemoteObserver):
                p.observe_remote(blocks, node_id)
