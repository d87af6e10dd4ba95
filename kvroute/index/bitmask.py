"""The prefix index as a dict: canonical block hash -> bitmask of node slots.

Nodes get small integer slots; the index maps each block hash to an int whose bit ``s`` is set
when the node in slot ``s`` caches the block (masks are interned, so nodes holding the same
blocks share one mask object). ``longest_prefix`` walks a request's hashes from block 0,
intersecting the set of nodes still matching, and stops when it is empty: time proportional to
the matched length, never to the index size.

To enumerate or drop one node's blocks without scanning the dict, each node keeps a sorted
uint64 array of its blocks plus a log of effective changes, merged with numpy when it grows.
Each tier (device, offloaded) has its own map and per-node arrays; the walk over both is
:meth:`BitmaskIndex.tiered_prefix`.
Memory is measured by ``kvroute bench registry`` (resident bytes per (block, node) entry),
lookup cost by ``kvroute bench decide``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from kvroute.index.base import DEVICE, OFFLOADED, TIERS, HashArray

KEY_MASK = (1 << 60) - 1
"""Dict keys keep the low 60 bits of a hash: a Python int below 2**60 takes 32 bytes instead
of 36 (40 with allocator rounding). Two blocks colliding in 60 bits (odds ~N**2 / 2**61: about
1 in 20,000 at 10M blocks) would only show as a false one-block overlap."""
_EMPTY: HashArray = np.zeros(0, dtype=np.uint64)


class _NodeBlocks:
    """One node's block set: sorted base array plus effective adds/removes since the merge."""

    __slots__ = ("base", "ops", "pending")

    def __init__(self) -> None:
        self.base: HashArray = _EMPTY
        self.ops: list[tuple[bool, HashArray]] = []
        self.pending = 0

    def log(self, added: bool, hashes: list[int]) -> None:
        if hashes:
            self.ops.append((added, np.array(hashes, dtype=np.uint64)))
            self.pending += len(hashes)
            if self.pending > max(4096, self.base.size // 2):
                self.merge()

    def merge(self) -> HashArray:
        if not self.ops:
            return self.base
        # one stable sort of base + logged changes: per hash, the last entry wins (the base
        # counts as an add before every change), so a block removed and stored again stays
        hashes = np.concatenate([self.base, *(a for _, a in self.ops)])
        flags = np.concatenate([np.ones(self.base.size, dtype=bool),
                                *(np.full(a.size, add, dtype=bool) for add, a in self.ops)])
        order = np.argsort(hashes, kind="stable")
        h, f = hashes[order], flags[order]
        last = np.ones(h.size, dtype=bool)
        last[:-1] = h[1:] != h[:-1]
        self.base = h[last & f]
        self.ops = []
        self.pending = 0
        return self.base


class _Tier:
    """One tier's map (hash -> slot bitmask) and per-node block sets."""

    __slots__ = ("_intern", "counts", "entries", "map", "nodes")

    def __init__(self, intern: Callable[[int], int]) -> None:
        self.map: dict[int, int] = {}
        self.nodes: dict[int, _NodeBlocks] = {}
        self.counts: dict[int, int] = {}
        self.entries = 0
        self._intern = intern

    def add(self, slot: int, hashes: Iterable[int]) -> int:
        bit = 1 << slot
        m = self.map
        get = m.get
        intern = self._intern
        new: list[int] = []
        for h in hashes:
            k = h & KEY_MASK
            cur = get(k, 0)
            if not cur & bit:
                mask = cur | bit
                m[k] = mask if mask < 256 else intern(mask)
                new.append(h)
        self._track(slot, True, new)
        return len(new)

    def remove(self, slot: int, hashes: Iterable[int]) -> int:
        bit = 1 << slot
        m = self.map
        get = m.get
        intern = self._intern
        gone: list[int] = []
        for h in hashes:
            k = h & KEY_MASK
            cur = get(k, 0)
            if cur & bit:
                rest = cur & ~bit
                if rest:
                    m[k] = rest if rest < 256 else intern(rest)
                else:
                    del m[k]
                gone.append(h)
        self._track(slot, False, gone)
        return len(gone)

    def _track(self, slot: int, added: bool, hashes: list[int]) -> None:
        if not hashes:
            return
        nb = self.nodes.get(slot)
        if nb is None:
            nb = self.nodes[slot] = _NodeBlocks()
        nb.log(added, hashes)
        n = len(hashes) if added else -len(hashes)
        self.counts[slot] = self.counts.get(slot, 0) + n
        self.entries += n

    def blocks(self, slot: int) -> HashArray:
        nb = self.nodes.get(slot)
        return _EMPTY if nb is None else nb.merge()

    def clear(self, slot: int) -> int:
        n = self.remove(slot, self.blocks(slot).tolist())
        nb = self.nodes.get(slot)
        if nb is not None:
            nb.base, nb.ops, nb.pending = _EMPTY, [], 0
        return n

    def drop(self, slot: int) -> int:
        n = self.clear(slot)
        self.nodes.pop(slot, None)
        self.counts.pop(slot, None)
        return n

    def node_bytes(self) -> int:
        return sum(nb.base.nbytes + nb.pending * 8 for nb in self.nodes.values())


class BitmaskIndex:
    """Block hash -> bitmask of node slots, per tier (a :class:`~kvroute.index.base.PrefixIndex`).

    Not thread-safe (one event loop).
    """

    def __init__(self) -> None:
        self._masks: dict[int, int] = {}
        self._tiers = tuple(_Tier(self._intern) for _ in TIERS)
        self._dev = self._tiers[DEVICE]
        self._low = self._tiers[OFFLOADED]

    @property
    def entries(self) -> int:
        """(block, node) pairs indexed, every tier."""
        return sum(t.entries for t in self._tiers)

    def _intern(self, mask: int) -> int:
        if mask < 256:
            return mask
        got = self._masks.setdefault(mask, mask)
        if len(self._masks) > 200_000:
            self._masks.clear()
        return got

    def add_node(self, slot: int) -> None:
        """Start tracking ``slot`` (empty); a no-op when it is tracked."""
        for t in self._tiers:
            t.nodes.setdefault(slot, _NodeBlocks())
            t.counts.setdefault(slot, 0)

    def count(self, slot: int, tier: int = DEVICE) -> int:
        """Blocks indexed for ``slot`` in ``tier``."""
        return self._tiers[tier].counts.get(slot, 0)

    def add(self, slot: int, hashes: Iterable[int], tier: int = DEVICE) -> int:
        """Index ``hashes`` on ``slot`` in ``tier``; returns how many were new."""
        return self._tiers[tier].add(slot, hashes)

    def remove(self, slot: int, hashes: Iterable[int], tier: int = DEVICE) -> int:
        """Drop ``hashes`` from ``slot``'s ``tier``; returns how many were present."""
        return self._tiers[tier].remove(slot, hashes)

    def blocks(self, slot: int, tier: int = DEVICE) -> HashArray:
        """Sorted array of the blocks indexed for ``slot`` in ``tier``."""
        return self._tiers[tier].blocks(slot)

    def clear(self, slot: int) -> int:
        """Drop every block of ``slot``, every tier; returns how many."""
        return sum(t.clear(slot) for t in self._tiers)

    def drop_node(self, slot: int) -> int:
        """Clear ``slot`` and forget it; returns blocks dropped."""
        return sum(t.drop(slot) for t in self._tiers)

    def has_lower_tier(self) -> bool:
        """True when some slot holds offloaded blocks."""
        return bool(self._low.map)

    def longest_prefix(self, hashes: Iterable[int], candidates: int) -> dict[int, int]:
        """Matched device-tier prefix length per slot in the ``candidates`` mask (slots with 0
        omitted).

        Walks hashes from block 0 and stops as soon as no candidate still matches: one dict
        probe, one AND and one comparison per matched block; the set of nodes still matching
        only changes (XOR, record) where some node's prefix ends. Int operations cost grows
        with the highest slot number (one 30-bit digit per 30 slots), nothing else with the
        fleet.
        """
        it = iter(hashes)
        get = self._dev.map.get
        for h in it:
            alive = get(h & KEY_MASK, 0) & candidates
            break
        else:
            return {}
        out: dict[int, int] = {}
        if not alive:
            return out
        i = 1
        for h in it:
            still = get(h & KEY_MASK, 0) & alive
            if still != alive:
                _record(out, alive ^ still, i)
                if not still:
                    return out
                alive = still
            i += 1
        _record(out, alive, i)
        return out

    def tiered_prefix(self, hashes: Sequence[int], candidates: int,
                      ) -> dict[int, tuple[int, int]]:
        """(device run, offloaded run after it) per slot of ``candidates`` (none: omitted).

        One walk: ``dev`` holds the slots still in their device run, ``low`` those that left
        it and continue on the offloaded tier. Only slots holding a block enter either mask
        (block 0 decides), so the cost grows with the matched length, not with the fleet.
        """
        if not self._low.map or not len(hashes):
            return {s: (n, 0) for s, n in self.longest_prefix(hashes, candidates).items()}
        dget, lget = self._dev.map.get, self._low.map.get
        dev, low = candidates, 0
        dlen: dict[int, int] = {}
        out: dict[int, tuple[int, int]] = {}
        i = 0
        for h in hashes:
            k = h & KEY_MASK
            on_low = lget(k, 0)
            still = dev & dget(k, 0)
            left = dev ^ still  # device run ends before block i
            cont = left & on_low
            if i:
                ended = left & ~on_low
                while ended:
                    b = ended & -ended
                    out[b.bit_length() - 1] = (i, 0)
                    ended ^= b
            if cont:
                _record(dlen, cont, i)
            gone = low & ~on_low
            while gone:
                b = gone & -gone
                s = b.bit_length() - 1
                out[s] = (dlen[s], i - dlen[s])
                gone ^= b
            dev, low = still, (low & on_low) | cont
            i += 1
            if not dev and not low:
                return out
        while dev:
            b = dev & -dev
            out[b.bit_length() - 1] = (i, 0)
            dev ^= b
        while low:
            b = low & -low
            s = b.bit_length() - 1
            out[s] = (dlen[s], i - dlen[s])
            low ^= b
        return out

    def approx_bytes(self) -> int:
        """Estimated memory of the index: dict tables, key ints, masks, per-node arrays."""
        key_bytes = self.entries_blocks() * 32
        node_bytes = sum(t.node_bytes() for t in self._tiers)
        return (sum(sys.getsizeof(t.map) for t in self._tiers) + key_bytes
                + sys.getsizeof(self._masks) + len(self._masks) * 36 + node_bytes)

    def entries_blocks(self) -> int:
        """Distinct (block hash, tier) keys indexed."""
        return sum(len(t.map) for t in self._tiers)


def _record(out: dict[int, int], mask: int, length: int) -> None:
    while mask:
        low = mask & -mask
        out[low.bit_length() - 1] = length
        mask ^= low
