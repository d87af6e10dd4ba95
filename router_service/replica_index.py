"""A local replica of the registry's placement index (pure data, no I/O).

Fed by ``Registry.WatchPlacement`` events: NODE_UPSERT, NODE_REMOVED, BLOCKS (cleared, removed,
stored) and SNAPSHOT_END. Lookup computes, per node, the longest prefix of the request's block
hashes the node holds — the same answer ``Registry.Lookup`` gives — without a network round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvroute.v1 import registry_pb2
from router_service.placement import NodeState

_KIND = registry_pb2.PlacementEvent


class ReplicaIndex:
    """Nodes and their cached block sets."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeState] = {}
        self._blocks: dict[str, set[int]] = {}
        self.block_size = 0
        self.complete = False
        """True once the initial snapshot ended (SNAPSHOT_END)."""

    def apply(self, ev: registry_pb2.PlacementEvent) -> None:
        """Apply one event (unknown kinds are ignored)."""
        if ev.block_size:
            self.block_size = ev.block_size
        kind = ev.kind
        if kind == _KIND.NODE_UPSERT:
            node = NodeState.from_info(ev.node)
            self.nodes[node.node_id] = node
            self._blocks.setdefault(node.node_id, set())
        elif kind == _KIND.NODE_REMOVED:
            self.nodes.pop(ev.node_id, None)
            self._blocks.pop(ev.node_id, None)
        elif kind == _KIND.BLOCKS:
            self.apply_blocks(ev.node_id, ev.stored, ev.removed, ev.cleared)
        elif kind == _KIND.SNAPSHOT_END:
            self.complete = True

    def apply_blocks(self, node_id: str, stored: Iterable[int], removed: Iterable[int],
                     cleared: bool) -> None:
        """``cleared`` first, then ``removed``, then ``stored`` (the registry's order)."""
        blocks = self._blocks.setdefault(node_id, set())
        if cleared:
            blocks.clear()
        blocks.difference_update(removed)
        blocks.update(stored)

    def blocks_of(self, node_id: str) -> int:
        """Blocks held for a node."""
        return len(self._blocks.get(node_id, ()))

    def lookup(self, block_hashes: Sequence[int], model: str,
               ) -> list[tuple[NodeState, int]]:
        """(node, longest cached prefix in blocks) for every node serving ``model``."""
        out: list[tuple[NodeState, int]] = []
        n = len(block_hashes)
        for nid, node in self.nodes.items():
            if node.model != model:
                continue
            held = self._blocks.get(nid)
            m = 0
            if held and n:
                while m < n and block_hashes[m] in held:
                    m += 1
            out.append((node, m))
        return out

    def models(self) -> set[str]:
        """Models served by known nodes."""
        return {n.model for n in self.nodes.values()}
