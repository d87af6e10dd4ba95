"""``round_robin``: healthy nodes in turn (a baseline that ignores cache and load)."""

from __future__ import annotations

from collections.abc import Sequence

from router_service.policies.base import Decision, NodeView, RequestView, healthy_nodes


class RoundRobinPolicy:
    """Cycle through the healthy nodes, sorted by id, one request each."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """The next healthy node in id order."""
        ok = sorted(healthy_nodes(nodes), key=lambda n: n.node_id)
        turn = self._next % len(ok)
        node = ok[turn]
        return Decision(node_id=node.node_id, matched_blocks=node.matched_blocks,
                        reason=f"round robin: turn {turn + 1} of {len(ok)} healthy nodes")

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Advance the turn."""
        self._next = (self._next + 1) % (1 << 62)
