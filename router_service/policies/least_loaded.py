"""``least_loaded``: fewest in-flight requests, then shortest engine queue, ties by node id.

Also the policy the router falls back to when the registry is unreachable (on its own in-flight
counts and the last queue depths it heard of).
"""

from __future__ import annotations

from collections.abc import Sequence

from router_service.policies.base import Candidate, Decision, NodeView, RequestView, healthy_nodes


def _key(n: NodeView) -> tuple[int, int, str]:
    return (n.inflight, n.queue_depth, n.node_id)


class LeastLoadedPolicy:
    """Pick the healthy node with the fewest router-counted in-flight requests.

    Score (lower is better) = in-flight requests; ties go to the shorter reported queue, then to
    the smaller node id, so the choice is deterministic.
    """

    name = "least_loaded"
    narrowable = True
    """The least-loaded nodes are always among the narrowed candidates."""

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """The least-loaded healthy node."""
        ranked = sorted(healthy_nodes(nodes), key=_key)
        best = ranked[0]
        cands = tuple(Candidate(n.node_id, float(n.inflight), n.matched_blocks, n.load)
                      for n in ranked)
        return Decision(
            node_id=best.node_id, matched_blocks=best.matched_blocks,
            reason=f"least loaded: {best.inflight} in flight, queue {best.queue_depth} "
                   f"(of {len(ranked)} healthy nodes)",
            candidates=cands)

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Stateless between decisions: nothing to record."""
