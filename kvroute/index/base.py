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

Tiers. A node holds blocks in its engine's device cache (:data:`DEVICE`, GPU memory) and may
hold more on an offloading medium (:data:`OFFLOADED`: vLLM's offloading connector ``CPU``,
SGLang HiCache ``CPU_PINNED`` / ``DISK``), which the engine loads back instead of recomputing.
The tiers are independent sets per node (a block may be in both: offloading copies it). Every
mutator and per-node read takes a ``tier`` (default :data:`DEVICE`); ``clear`` and
``drop_node`` act on every tier; ``entries`` counts (block, slot) pairs of every tier.
``longest_prefix`` walks the device tier only. ``tiered_prefix`` gives, per slot, the device
run ``hashes[0..d)`` and then the lower-tier run ``hashes[d..d+o)`` that continues it: after the
device run ends only blocks held on the offloaded tier extend it, and the first block held on
neither ends the walk. That is what the engines reuse: vLLM computes the GPU prefix hit, then
asks its offloading connector for the blocks from there on, which stops at the first block its
store lacks; SGLang's HiCache walks device nodes and then host-backed ones. Chained hashes make
nothing after a hole reusable, so a hole always ends the match.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

HashArray = npt.NDArray[np.uint64]
"""A 1-D array of canonical block hashes."""

DEVICE = 0
"""Tier of blocks in the engine's device (GPU) KV cache."""
OFFLOADED = 1
"""Tier of blocks held on an offloading medium (CPU, CPU_PINNED, DISK...): a lower tier."""
TIERS = (DEVICE, OFFLOADED)
"""Every tier, highest first."""


class PrefixIndex(Protocol):
    """Block hash -> node slots holding it, with longest-prefix lookup. Single-threaded."""

    @property
    def entries(self) -> int:
        """(block, slot) pairs indexed, every tier."""
        ...

    def add_node(self, slot: int) -> None:
        """Start tracking ``slot`` (empty); a no-op when it is tracked."""
        ...

    def count(self, slot: int, tier: int = DEVICE) -> int:
        """Blocks indexed for ``slot`` in ``tier`` (0 for an unknown slot)."""
        ...

    def add(self, slot: int, hashes: Iterable[int], tier: int = DEVICE) -> int:
        """Index ``hashes`` on ``slot`` in ``tier``; returns how many were new."""
        ...

    def remove(self, slot: int, hashes: Iterable[int], tier: int = DEVICE) -> int:
        """Drop ``hashes`` from ``slot``'s ``tier``; returns how many were present."""
        ...

    def clear(self, slot: int) -> int:
        """Drop every block of ``slot``, every tier (it stays tracked); returns how many."""
        ...

    def drop_node(self, slot: int) -> int:
        """Clear ``slot`` and forget it; returns blocks dropped (every tier)."""
        ...

    def blocks(self, slot: int, tier: int = DEVICE) -> HashArray:
        """Sorted array of the blocks indexed for ``slot`` in ``tier``."""
        ...

    def longest_prefix(self, hashes: Sequence[int], candidates: int) -> dict[int, int]:
        """Matched device-tier prefix length per slot of the ``candidates`` bitmask (no
        match: omitted)."""
        ...

    def tiered_prefix(self, hashes: Sequence[int], candidates: int,
                      ) -> dict[int, tuple[int, int]]:
        """Per slot of ``candidates``: (device run, lower-tier run after it), see the module
        docstring; slots matching nothing omitted. Same cost rule as ``longest_prefix``."""
        ...

    def has_lower_tier(self) -> bool:
        """True when some slot holds blocks in a tier below :data:`DEVICE`."""
        ...

    def entries_blocks(self) -> int:
        """Distinct (block hash, tier) keys indexed."""
        ...

    def approx_bytes(self) -> int:
        """Estimated memory of the index in bytes (for the metrics)."""
        ...
