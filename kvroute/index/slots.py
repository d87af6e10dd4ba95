"""Node ids as small integer slots, and the slots of each model as one bitmask.

A :class:`~kvroute.index.base.PrefixIndex` addresses nodes by slot so that "the nodes serving
model m" is one int and the index intersects it with a block's holders in one operation. Freed
slots are reused lowest first, keeping masks short.
"""

from __future__ import annotations

import heapq


class SlotTable:
    """node id -> slot, model -> bitmask of its nodes' slots."""

    def __init__(self) -> None:
        self._slot: dict[str, int] = {}
        self._node: dict[int, str] = {}
        self._model: dict[str, str] = {}
        self._masks: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 0

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._slot

    def assign(self, node_id: str, model: str) -> int:
        """The slot of ``node_id`` (a new one if unknown); records (or moves) it to ``model``."""
        slot = self._slot.get(node_id)
        if slot is None:
            slot = heapq.heappop(self._free) if self._free else self._take_next()
            self._slot[node_id] = slot
            self._node[slot] = node_id
        else:
            old = self._model[node_id]
            if old == model:
                return slot
            self._unmask(old, slot)
        self._model[node_id] = model
        self._masks[model] = self._masks.get(model, 0) | (1 << slot)
        return slot

    def _take_next(self) -> int:
        self._next += 1
        return self._next - 1

    def _unmask(self, model: str, slot: int) -> None:
        mask = self._masks.get(model, 0) & ~(1 << slot)
        if mask:
            self._masks[model] = mask
        else:
            self._masks.pop(model, None)

    def release(self, node_id: str) -> int | None:
        """Forget ``node_id``; returns its slot (now free) or None if it was unknown."""
        slot = self._slot.pop(node_id, None)
        if slot is None:
            return None
        self._unmask(self._model.pop(node_id), slot)
        del self._node[slot]
        heapq.heappush(self._free, slot)
        return slot

    def slot(self, node_id: str) -> int | None:
        """Slot of ``node_id``, None if unknown."""
        return self._slot.get(node_id)

    def node_at(self, slot: int) -> str | None:
        """Node id holding ``slot``, None if free."""
        return self._node.get(slot)

    def model_mask(self, model: str) -> int:
        """Bitmask of the slots of ``model``'s nodes (0 if none)."""
        return self._masks.get(model, 0)

    def all_mask(self) -> int:
        """Bitmask of every assigned slot."""
        mask = 0
        for m in self._masks.values():
            mask |= m
        return mask

    def models(self) -> set[str]:
        """Models with at least one node."""
        return set(self._masks)
