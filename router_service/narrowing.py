"""Candidate narrowing: a large fleet's decision scores a bounded set of nodes.

Scoring every node makes a decision's cost grow with the fleet (1,024 nodes: a NodeView, a
Candidate and every scorer per node, ~40x the cost at 8 nodes). But a node can only win a
kv_aware or least_loaded decision by holding a long prefix or by being lightly loaded, so the
core scores the union of

- the ``k`` nodes holding the longest prefix (from the index's matches, whose cost grows with
  the matched prefix, never with the fleet), ties to fewer in flight, and
- the ``k`` least-loaded healthy nodes by this router's in-flight count: first idle nodes in a
  rotating order (so equal idle nodes share work), then busy ones by count,

with ``k = max_candidates // 2``. Fleet-wide load figures (nodes, requests in flight) travel in
the RequestView so the load cap keeps its meaning. Fleets no larger than ``max_candidates`` are
scored whole (decisions identical to no narrowing).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence

from router_service.placement import NodeState


class Narrower:
    """Picks the candidate set of one decision (module docstring)."""

    def __init__(self, max_candidates: int) -> None:
        self.k = max(2, max_candidates // 2)
        self._turn = 0

    def select(self, members: Sequence[NodeState], matches: Mapping[str, int],
               node: Callable[[str], NodeState | None], counts: Mapping[str, int],
               ) -> list[tuple[NodeState, int]]:
        """(node, matched blocks) for the candidates among ``members`` (all of one model)."""
        k = self.k
        out: dict[str, tuple[NodeState, int]] = {}
        if matches:
            get = counts.get
            for nid, m in heapq.nsmallest(k, matches.items(),
                                          key=lambda kv: (-kv[1], get(kv[0], 0), kv[0])):
                n = node(nid)
                if n is not None and n.healthy:
                    out[nid] = (n, m)
        n_members = len(members)
        start = self._turn % n_members
        self._turn += 1
        idle = 0
        for i in range(n_members):
            if idle >= k:
                break
            n = members[(start + i) % n_members]
            if n.healthy and n.node_id not in counts:
                idle += 1
                if n.node_id not in out:
                    out[n.node_id] = (n, matches.get(n.node_id, 0))
        if idle < k:  # fewer idle nodes than wanted: add the least busy of this model
            model = members[0].model
            added = 0
            for nid, _ in sorted(counts.items(), key=lambda kv: kv[1]):
                n = node(nid)
                if n is None or not n.healthy or n.model != model:
                    continue
                out.setdefault(nid, (n, matches.get(nid, 0)))
                added += 1
                if idle + added >= k:
                    break
        return list(out.values())
