"""``least_loaded``: fewest in-flight requests, then shortest engine queue, ties in turn.

Also the policy the router falls back to when the registry is unreachable, on its own in-flight
counts only (``use_queue_depth=False``: the last queue depths it heard of are stale and would
send every request to the node that happened to report the shortest queue).
"""

from __future__ import annotations

from collections.abc import Sequence

from router_service.policies.base import Candidate, Decision, NodeView, RequestView, healthy_nodes


class LeastLoadedPolicy:
    """Pick the healthy node with the fewest router-counted in-flight requests.

    Score (lower is better) = in-flight requests, then the reported queue (unless
    ``use_queue_depth`` is off). Nodes that tie take turns: the n-th committed decision among
    tied nodes (sorted by id) goes to tie number ``n mod ties``, so requests that never overlap
    (each completes before the next starts, so every count is 0) still spread evenly instead of
    all going to the smallest node id. Deterministic for a given sequence of decisions.
    """

    name = "least_loaded"
    narrowable = True
    """The least-loaded nodes are always among the narrowed candidates."""

    def __init__(self, use_queue_depth: bool = True) -> None:
        self._use_queue = use_queue_depth
        self._turn = 0

    def _key(self, n: NodeView) -> tuple[int, int]:
        return (n.inflight, n.queue_depth if self._use_queue else 0)

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """The least-loaded healthy node (ties in turn)."""
        ranked = sorted(healthy_nodes(nodes), key=lambda n: (self._key(n), n.node_id))
        low = self._key(ranked[0])
        ties = sum(1 for n in ranked if self._key(n) == low)
        if ties > 1:  # rotate the tied head so the chosen node comes first
            k = self._turn % ties
            ranked = ranked[k:ties] + ranked[:k] + ranked[ties:]
        best = ranked[0]
        cands = tuple(Candidate(n.node_id, float(n.inflight), n.matched_blocks, n.load)
                      for n in ranked)
        queue = f", queue {best.queue_depth}" if self._use_queue else ""
        tie = f"; {ties} tied, taking turns" if ties > 1 else ""
        return Decision(
            node_id=best.node_id, matched_blocks=best.matched_blocks,
            reason=f"least loaded: {best.inflight} in flight{queue} (of {len(ranked)} healthy "
                   f"nodes{tie})",
            candidates=cands)

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Advance the tie-break turn."""
        self._turn += 1
