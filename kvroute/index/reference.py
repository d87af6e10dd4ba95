"""The reference prefix index: plain Python sets, written to be obviously correct.

Not for serving (about 3x the memory of :class:`~kvroute.index.bitmask.BitmaskIndex`); the
behaviour suite runs every other implementation against it under random churn, so it is the
executable statement of the :class:`~kvroute.index.base.PrefixIndex` contract.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import numpy as np

from kvroute.index.base import DEVICE, OFFLOADED, TIERS, HashArray


class _TierSets:
    """One tier: block hash -> set of slots, and slot -> set of hashes."""

    def __init__(self) -> None:
        self.slots_of: dict[int, set[int]] = {}
        self.blocks_of: dict[int, set[int]] = {}

    def add(self, slot: int, hashes: Iterable[int]) -> int:
        mine = self.blocks_of.setdefault(slot, set())
        new = 0
        for h in hashes:
            if h not in mine:
                mine.add(h)
                self.slots_of.setdefault(h, set()).add(slot)
                new += 1
        return new

    def remove(self, slot: int, hashes: Iterable[int]) -> int:
        mine = self.blocks_of.get(slot)
        if mine is None:
            return 0
        gone = 0
        for h in hashes:
            if h in mine:
                mine.discard(h)
                holders = self.slots_of[h]
                holders.discard(slot)
                if not holders:
                    del self.slots_of[h]
                gone += 1
        return gone

    def holds(self, slot: int, h: int) -> bool:
        return slot in self.slots_of.get(h, ())


class ReferenceIndex:
    """Per tier: block hash -> set of slots, and slot -> set of hashes."""

    def __init__(self) -> None:
        self._tiers = {t: _TierSets() for t in TIERS}

    @property
    def entries(self) -> int:
        """(block, slot) pairs indexed, every tier."""
        return sum(len(b) for t in self._tiers.values() for b in t.blocks_of.values())

    def add_node(self, slot: int) -> None:
        """Start tracking ``slot`` (empty); a no-op when it is tracked."""
        for t in self._tiers.values():
            t.blocks_of.setdefault(slot, set())

    def count(self, slot: int, tier: int = DEVICE) -> int:
        """Blocks indexed for ``slot`` in ``tier``."""
        return len(self._tiers[tier].blocks_of.get(slot, ()))

    def add(self, slot: int, hashes: Iterable[int], tier: int = DEVICE) -> int:
        """Index ``hashes`` on ``slot`` in ``tier``; returns how many were new."""
        return self._tiers[tier].add(slot, hashes)

    def remove(self, slot: int, hashes: Iterable[int], tier: int = DEVICE) -> int:
        """Drop ``hashes`` from ``slot``'s ``tier``; returns how many were present."""
        return self._tiers[tier].remove(slot, hashes)

    def clear(self, slot: int) -> int:
        """Drop every block of ``slot``, every tier; returns how many."""
        return sum(t.remove(slot, list(t.blocks_of.get(slot, ())))
                   for t in self._tiers.values())

    def drop_node(self, slot: int) -> int:
        """Clear ``slot`` and forget it; returns blocks dropped."""
        n = self.clear(slot)
        for t in self._tiers.values():
            t.blocks_of.pop(slot, None)
        return n

    def blocks(self, slot: int, tier: int = DEVICE) -> HashArray:
        """Sorted array of the blocks indexed for ``slot`` in ``tier``."""
        return np.array(sorted(self._tiers[tier].blocks_of.get(slot, ())), dtype=np.uint64)

    def has_lower_tier(self) -> bool:
        """True when some slot holds offloaded blocks."""
        return bool(self._tiers[OFFLOADED].slots_of)

    def longest_prefix(self, hashes: Sequence[int], candidates: int) -> dict[int, int]:
        """Matched device prefix length per slot of the ``candidates`` bitmask."""
        dev = self._tiers[DEVICE]
        out: dict[int, int] = {}
        for slot in self._candidates(hashes, candidates):
            n = 0
            while n < len(hashes) and dev.holds(slot, hashes[n]):
                n += 1
            if n:
                out[slot] = n
        return out

    def tiered_prefix(self, hashes: Sequence[int], candidates: int,
                      ) -> dict[int, tuple[int, int]]:
        """(device run, offloaded run after it) per slot of ``candidates``."""
        dev, low = self._tiers[DEVICE], self._tiers[OFFLOADED]
        out: dict[int, tuple[int, int]] = {}
        for slot in self._candidates(hashes, candidates):
            d = 0
            while d < len(hashes) and dev.holds(slot, hashes[d]):
                d += 1
            o = 0
            while d + o < len(hashes) and low.holds(slot, hashes[d + o]):
                o += 1
            if d or o:
                out[slot] = (d, o)
        return out

    def _candidates(self, hashes: Sequence[int], candidates: int) -> set[int]:
        """Candidate slots holding block 0 on some tier."""
        if not len(hashes):
            return set()
        return {s for t in self._tiers.values() for s in t.slots_of.get(hashes[0], ())
                if candidates >> s & 1}

    def entries_blocks(self) -> int:
        """Distinct (block hash, tier) keys indexed."""
        return sum(len(t.slots_of) for t in self._tiers.values())

    def approx_bytes(self) -> int:
        """Rough size: the dicts plus their sets (ints not counted)."""
        return sum(sys.getsizeof(t.slots_of) + sys.getsizeof(t.blocks_of)
                   + sum(sys.getsizeof(v) for v in t.slots_of.values())
                   + sum(sys.getsizeof(v) for v in t.blocks_of.values())
                   for t in self._tiers.values())
