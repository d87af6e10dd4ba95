"""Nodes a front end just failed to reach, kept out of decisions for a short while.

The gateway marks a node suspect after a connect error or a 5xx before the first byte; for
``hold_s`` seconds decisions treat it as unhealthy — unless every candidate is suspect, in
which case nothing is demoted (a suspicion never turns "some node" into "no node"). The
registry's own health (heartbeats, engine liveness) takes over after that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from router_service.policies.base import NodeView

DEFAULT_HOLD_S = 5.0
"""How long a suspect node is avoided."""


class SuspectList:
    """node id -> (until, why), on an injected clock."""

    def __init__(self, clock: Callable[[], float], hold_s: float = DEFAULT_HOLD_S) -> None:
        self._clock = clock
        self._hold_s = hold_s
        self._until: dict[str, tuple[float, str]] = {}

    def mark(self, node_id: str, why: str) -> None:
        """Avoid ``node_id`` for ``hold_s`` seconds from now."""
        self._until[node_id] = (self._clock() + self._hold_s, why)

    def active(self) -> dict[str, str]:
        """Suspect node ids and why (expired entries dropped)."""
        if not self._until:
            return {}
        now = self._clock()
        for nid in [n for n, (t, _) in self._until.items() if t <= now]:
            del self._until[nid]
        return {n: why for n, (_, why) in self._until.items()}

    def demote(self, views: Sequence[NodeView]) -> list[NodeView]:
        """``views`` with suspect nodes marked unhealthy, unless no healthy node would remain."""
        active = self.active() if self._until else {}
        if not active:
            return list(views)
        out = [dataclasses.replace(v, healthy=False) if v.node_id in active else v
               for v in views]
        return out if any(v.healthy for v in out) else list(views)
