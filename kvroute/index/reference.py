"""The reference prefix index: plain Python sets, written to be obviously correct.

Not for serving (about 3x the memory of :class:`~kvroute.index.bitmask.BitmaskIndex`); the
behaviour suite runs every other implementation against it under random churn, so it is the
executable statement of the :class:`~kvroute.index.base.PrefixIndex` contract.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import numpy as np

from kvroute.index.base import HashArray


class ReferenceIndex:
    """Block hash -> set of slots, and slot -> set of hashes."""

    def __init__(self) -> None:
        self._slots_of: dict[int, set[int]] = {}
        self._blocks_of: dict[int, set[int]] = {}

    @property
    def entries(self) -> int:
        """(block, slot) pairs indexed."""
        return sum(len(b) for b in self._blocks_of.values())

    def add_node(self, slot: int) -> None:
        """Start tracking ``slot`` (empty); a no-op when it is tracked."""
        self._blocks_of.setdefault(slot, set())

    def count(self, slot: int) -> int:
        """Blocks indexed for ``slot``."""
        return len(self._blocks_of.get(slot, ()))

    def add(self, slot: int, hashes: Iterable[int]) -> int:
        """Index ``hashes`` on ``slot``; returns how many were new."""
        mine = self._blocks_of.setdefault(slot, set())
        new = 0
        for h in hashes:
            if h not in mine:
                mine.add(h)
                self._slots_of.setdefault(h, set()).add(slot)
                new += 1
        return new

    def remove(self, slot: int, hashes: Iterable[int]) -> int:
        """Drop ``hashes`` from ``slot``; returns how many were present."""
        mine = self._blocks_of.get(slot)
        if mine is None:
            return 0
        gone = 0
        for h in hashes:
            if h in mine:
                mine.discard(h)
                holders = self._slots_of[h]
                holders.discard(slot)
                if not holders:
                    del self._slots_of[h]
                gone += 1
        return gone

    def clear(self, slot: int) -> int:
        """Drop every block of ``slot``; returns how many."""
        return self.remove(slot, list(self._blocks_of.get(slot, ())))

    def drop_node(self, slot: int) -> int:
        """Clear ``slot`` and forget it; returns blocks dropped."""
        n = self.clear(slot)
        self._blocks_of.pop(slot, None)
        return n

    def blocks(self, slot: int) -> HashArray:
        """Sorted array of the blocks indexed for ``slot``."""
        return np.array(sorted(self._blocks_of.get(slot, ())), dtype=np.uint64)

    def longest_prefix(self, hashes: Sequence[int], candidates: int) -> dict[int, int]:
        """Matched prefix length per slot of the ``candidates`` bitmask (no match: omitted)."""
        alive = {s for s in self._slots_of.get(hashes[0], ()) if candidates >> s & 1} \
            if len(hashes) else set()
        out: dict[int, int] = {}
        for i, h in enumerate(hashes):
            holders = self._slots_of.get(h, set())
            for s in alive - holders:
                out[s] = i
            alive &= holders
            if not alive:
                return out
        for s in alive:
            out[s] = len(hashes)
        return out

    def entries_blocks(self) -> int:
        """Distinct block hashes indexed."""
        return len(self._slots_of)

    def approx_bytes(self) -> int:
        """Rough size: the two dicts plus their sets (ints not counted)."""
        return (sys.getsizeof(self._slots_of) + sys.getsizeof(self._blocks_of)
                + sum(sys.getsizeof(v) for v in self._slots_of.values())
                + sum(sys.getsizeof(v) for v in self._blocks_of.values()))
