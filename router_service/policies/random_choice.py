"""``random``: a uniformly random healthy node (the floor every other policy must beat)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from kvroute.settings import setting
from router_service.policies.base import Decision, NodeView, RequestView, healthy_nodes


@dataclass(frozen=True)
class RandomSettings:
    """Settings of the ``random`` policy."""

    random_seed: int = setting(0, "Seed of the random policy's generator (reproducible runs)")


class RandomPolicy:
    """Uniform choice among healthy nodes from a seeded generator (no clock, no I/O)."""

    name = "random"

    def __init__(self, settings: RandomSettings | None = None) -> None:
        self._rng = random.Random((settings or RandomSettings()).random_seed)

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """A random healthy node."""
        ok = sorted(healthy_nodes(nodes), key=lambda n: n.node_id)
        node = ok[self._rng.randrange(len(ok))]
        return Decision(node_id=node.node_id, matched_blocks=node.matched_blocks,
                        reason=f"random among {len(ok)} healthy nodes")

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Stateless between decisions: nothing to record."""
