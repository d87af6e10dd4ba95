"""Overlap source ``recent_routes``: prefixes routed to a node moments ago count as cached there.

Covers the gap between routing a request and its blocks reaching the registry (queued prefill,
heartbeat interval): a follow-up request whose prefix was just sent to a node, but is not yet in
any cache or the registry, follows it instead of being scattered. Remembers at least ``window``
decisions and twice the fleet's in-flight count; memory is bounded by that window. A belief is
not renewed by routing the same blocks to the same node again: it ends ``window`` decisions after
the first such route, so only the registry (what the engine reported) keeps a prefix on a node
for longer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from router_service.policies.base import NodeView, RequestView
from router_service.policies.plugins.interfaces import Cycle


class RecentRoutes:
    """Which node the latest recent request carrying each block went to."""

    name = "recent_routes"

    def __init__(self, window: int) -> None:
        self.window = window
        self._seq = 0
        self._owner: dict[int, tuple[str, int]] = {}
        self._log: deque[tuple[int, Sequence[int]]] = deque()
        self._last_window = window

    def overlap(self, request: RequestView, nodes: Sequence[NodeView]) -> list[int]:
        """max(registry overlap, leading blocks recently routed to the node)."""
        depth = self.depths(request.block_hashes) if self.window else {}
        if not depth:
            return [v.matched_blocks for v in nodes]
        return [max(v.matched_blocks, depth.get(v.node_id, 0)) for v in nodes]

    def depths(self, blocks: Sequence[int]) -> dict[str, int]:
        """Per node: leading blocks of ``blocks`` recently routed there."""
        out: dict[str, int] = {}
        owner = self._owner
        for i, h in enumerate(blocks):
            cur = owner.get(h)
            if cur is None:
                break
            out[cur[0]] = i + 1
        return out

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """Remember where the request's blocks went."""
        if self.window:
            self._last_window = max(self.window, 2 * cycle.total_inflight)
            self.record(cycle.request.block_hashes, cycle.nodes[chosen].node_id,
                        self._last_window)

    def observe_remote(self, blocks: Sequence[int], node_id: str) -> None:
        """Another router replica sent ``blocks`` to ``node_id``: remember it like our own
        (the window then spans every replica's decisions, as the fleet's in-flight does)."""
        if self.window:
            self.record(blocks, node_id, self._last_window)

    def record(self, blocks: Sequence[int], node_id: str, window: int) -> None:
        """Remember that ``blocks`` went to ``node_id``; forget decisions older than window."""
        self._seq += 1
        seq = self._seq
        owner = self._owner
        for h in blocks:
            cur = owner.get(h)
            # A block routed again to the node that already has it keeps its first decision's
            # age: the belief lasts ``window`` decisions from the first route, then only the
            # registry's report can hold the node. Refreshing it on every route would let a
            # belief the engine never confirmed (request aborted before prefill, events lost)
            # keep drawing the prefix to that node for as long as it keeps being requested.
            if cur is None or cur[0] != node_id:
                owner[h] = (node_id, seq)
        self._log.append((seq, blocks))
        limit = seq - window
        while self._log and self._log[0][0] <= limit:
            old_seq, old_blocks = self._log.popleft()
            for h in old_blocks:
                cur = owner.get(h)
                if cur is not None and cur[1] == old_seq:
                    del owner[h]
