"""The prefix index interface: which node slots cache which blocks, longest cached prefix.

One interface, used by the registry (its in-memory view of the fleet) and by the router's
:class:`~router_service.index_mirror.IndexMirror` (its copy of the registry's index, fed by
``WatchPlacement``). Nodes are small integer *slots* (see :class:`kvroute.index.slots.SlotTable`)
so a set of candidate nodes is one int bitmask. Every implementation passes the same behaviour
suite (``tests/unit/test_prefix_index.py``).

Contract, for every implementation:

- ``add``/``remove`` are idempotent per (block, slot) and return how many pairs changed;
  duplicate hashes in one call count once.
- ``longest_prefix(hashes, candidates)`` gives, per candidate slot whose cache holds
  ``hashes[0]``, the length of the longest run ``hashes[0..k)`` it holds; slots with no match
  are omitted. Its cost may grow with the matched length, never with the number of slots that
  do not match nor with the number of blocks indexed.
- Hashes are unsigned 64-bit ints; ``blocks(slot)`` returns them in full, sorted (snapshots are
  written from it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

HashArray = npt.NDArray[np.uint64]
"""A 1-D array of canonical block hashes."""


class PrefixIndex(Protocol):
    """Block hash -> node slots holding it, with longest-prefix lookup. Single-threaded."""

    @property
    def entries(self) -> int:
        """(block, slot) pairs indexed."""
        ...

    def add_node(self, slot: int) -> None:
        """Start tracking ``slot`` (empty); a no-op when it is tracked."""
        ...

    def count(self, slot: int) -> int:
        """Blocks indexed for ``slot`` (0 for an unknown slot)."""
        ...

    def add(self, slot: int, hashes: Iterable[int]) -> int:
        """Index ``hashes`` on ``slot``; returns how many were new."""
        ...

    def remove(self, slot: int, hashes: Iterable[int]) -> int:
        """Drop ``hashes`` from ``slot``; returns how many were present."""
        ...

    def clear(self, slot: int) -> int:
        """Drop every block of ``slot`` (it stays tracked); returns how many."""
        ...

    def drop_node(self, slot: int) -> int:
        """Clear ``slot`` and forget it; returns blocks dropped."""
        ...

    def blocks(self, slot: int) -> HashArray:
        """Sorted array of the blocks indexed for ``slot``."""
        ...

    def longest_prefix(self, hashes: Sequence[int], candidates: int) -> dict[int, int]:
        """Matched prefix length per slot of the ``candidates`` bitmask (no match: omitted)."""
        ...

    def entries_blocks(self) -> int:
        """Distinct block hashes indexed."""
        ...

    def approx_bytes(self) -> int:
        """Estimated memory of the index in bytes (for the metrics)."""
        ...
