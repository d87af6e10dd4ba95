"""The router's mirror of the registry's placement index (pure data, no I/O).

Fed by ``Registry.WatchPlacement`` events: NODE_UPSERT, NODE_REMOVED, BLOCKS (cleared, removed,
stored) and SNAPSHOT_END. Blocks live in the shared :class:`~kvroute.index.PrefixIndex` (the
registry's own), nodes in slots of a :class:`~kvroute.index.SlotTable`, so :meth:`lookup` gives
the same answer as ``Registry.Lookup`` at a cost that grows with the matched prefix, not with the
nodes that hold none of it.
Offloaded blocks (``stored_offloaded`` / ``removed_offloaded``) go to the index's lower tier;
:meth:`lookup_tiers` adds, per node, the offloaded run after its device prefix (what
``NodeMatch.offloaded_blocks`` holds).

("Replica" is a registry process; this is the router's mirror of an index, not a replica.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvroute.index import OFFLOADED, BitmaskIndex, PrefixIndex, SlotTable
from kvroute.v1 import registry_pb2
from router_service.placement import DepartureHook, NodeState

_KIND = registry_pb2.PlacementEvent


def _ignore(node_id: str) -> None:
    pass


class IndexMirror:
    """Nodes and the blocks they cache, as the registry last told."""

    def __init__(self, index: PrefixIndex | None = None) -> None:
        self.nodes: dict[str, NodeState] = {}
        self._index: PrefixIndex = BitmaskIndex() if index is None else index
        self._slots = SlotTable()
        self._members: dict[str, list[tuple[NodeState, int]]] = {}
        self._member_nodes: dict[str, list[NodeState]] = {}
        """Per model: (node, slot) of its nodes, in arrival order; rebuilt when membership
        changes (a status update changes the NodeState in place)."""
        self.departed: DepartureHook = _ignore
        """Called with the id of each node removed (NODE_REMOVED)."""
        self.block_size = 0
        self.complete = False
        """True once the initial snapshot ended (SNAPSHOT_END)."""

    def apply(self, ev: registry_pb2.PlacementEvent) -> None:
        """Apply one event (unknown kinds are ignored)."""
        if ev.block_size:
            self.block_size = ev.block_size
        kind = ev.kind
        if kind == _KIND.NODE_UPSERT:
            self.upsert(NodeState.from_info(ev.node))
        elif kind == _KIND.NODE_REMOVED:
            self.remove(ev.node_id)
        elif kind == _KIND.BLOCKS:
            self.apply_blocks(ev.node_id, ev.stored, ev.removed, ev.cleared)
            if ev.stored_offloaded or ev.removed_offloaded:
                self.apply_offloaded(ev.node_id, ev.stored_offloaded, ev.removed_offloaded)
        elif kind == _KIND.SNAPSHOT_END:
            self.complete = True

    def upsert(self, node: NodeState) -> None:
        """Add a node or refresh its record and usage (in place: lookups see it at once)."""
        old = self.nodes.get(node.node_id)
        if old is not None and old.model == node.model:
            old.update_from(node)
            return
        if old is not None:  # the node now serves another model: its blocks stay its own
            self._forget_model(old.model)
        slot = self._slots.assign(node.node_id, node.model)
        self._index.add_node(slot)
        self.nodes[node.node_id] = node
        self._forget_model(node.model)

    def remove(self, node_id: str) -> None:
        """Forget a node and its blocks."""
        node = self.nodes.pop(node_id, None)
        slot = self._slots.release(node_id)
        if slot is not None:
            self._index.drop_node(slot)
        if node is not None:
            self._forget_model(node.model)
            self.departed(node_id)

    def apply_blocks(self, node_id: str, stored: Iterable[int], removed: Iterable[int],
                     cleared: bool) -> None:
        """``cleared`` first, then ``removed``, then ``stored`` (the registry's order).

        Blocks of a node not (yet) upserted are ignored: the registry sends NODE_UPSERT first.
        """
        slot = self._slots.slot(node_id)
        if slot is None:
            return
        if cleared:
            self._index.clear(slot)
        self._index.remove(slot, removed)
        self._index.add(slot, stored)

    def apply_offloaded(self, node_id: str, stored: Iterable[int], removed: Iterable[int],
                        ) -> None:
        """Offloaded-tier changes of a node: ``removed`` first, then ``stored``."""
        slot = self._slots.slot(node_id)
        if slot is None:
            return
        self._index.remove(slot, removed, OFFLOADED)
        self._index.add(slot, stored, OFFLOADED)

    def blocks_of(self, node_id: str, tier: int = 0) -> int:
        """Blocks held for a node in ``tier`` (default: the device tier)."""
        slot = self._slots.slot(node_id)
        return 0 if slot is None else self._index.count(slot, tier)

    def _forget_model(self, model: str) -> None:
        self._members.pop(model, None)
        self._member_nodes.pop(model, None)

    def _of_model(self, model: str) -> list[tuple[NodeState, int]]:
        members = self._members.get(model)
        if members is None:
            slots = self._slots
            members = [(n, slots.assign(nid, model)) for nid, n in self.nodes.items()
                       if n.model == model]  # assign() of a known node = its slot
            self._members[model] = members
        return members

    def lookup(self, block_hashes: Sequence[int], model: str,
               ) -> list[tuple[NodeState, int]]:
        """(node, longest cached prefix in blocks) for every node serving ``model``."""
        members = self._of_model(model)
        if not members:
            return []
        mask = self._slots.model_mask(model)
        matched = self._index.longest_prefix(block_hashes, mask) if len(block_hashes) else {}
        if not matched:
            return [(n, 0) for n, _ in members]
        get = matched.get
        return [(n, get(s, 0)) for n, s in members]

    def lookup_tiers(self, block_hashes: Sequence[int], model: str,
                     ) -> tuple[list[tuple[NodeState, int]], dict[str, int]]:
        """:meth:`lookup`, plus node id -> offloaded blocks continuing its device prefix
        (nodes without any omitted; no extra cost while no node has offloaded blocks)."""
        if not self._index.has_lower_tier():
            return self.lookup(block_hashes, model), {}
        members = self._of_model(model)
        if not members or not len(block_hashes):
            return [(n, 0) for n, _ in members], {}
        tiers = self._index.tiered_prefix(block_hashes, self._slots.model_mask(model))
        none = (0, 0)
        pairs: list[tuple[NodeState, int]] = []
        off: dict[str, int] = {}
        for n, s in members:
            dev, low = tiers.get(s, none)
            pairs.append((n, dev))
            if low:
                off[n.node_id] = low
        return pairs, off

    def offloaded_matches(self, block_hashes: Sequence[int], model: str) -> dict[str, int]:
        """Only the nodes of ``model`` with offloaded blocks continuing their device prefix:
        node id -> those blocks (cost grows with the match, as :meth:`matches`)."""
        mask = self._slots.model_mask(model)
        if not mask or not len(block_hashes) or not self._index.has_lower_tier():
            return {}
        node_at = self._slots.node_at
        return {node_at(s) or "": low
                for s, (_, low) in self._index.tiered_prefix(block_hashes, mask).items() if low}

    def members(self, model: str) -> list[NodeState]:
        """Nodes of ``model`` (a cached list; do not modify)."""
        cached = self._member_nodes.get(model)
        if cached is None:
            cached = [n for n, _ in self._of_model(model)]
            self._member_nodes[model] = cached
        return cached

    def matches(self, block_hashes: Sequence[int], model: str) -> dict[str, int]:
        """Only the nodes of ``model`` holding a prefix: node id -> matched blocks.

        Cost grows with the matched prefix, not with the nodes of the model (:meth:`lookup`
        lists every node, so it cannot).
        """
        mask = self._slots.model_mask(model)
        if not mask or not len(block_hashes):
            return {}
        node_at = self._slots.node_at
        return {node_at(s) or "": m
                for s, m in self._index.longest_prefix(block_hashes, mask).items()}

    def models(self) -> set[str]:
        """Models served by known nodes."""
        return self._slots.models()
