"""The per-worker approximate prefix tree the cache-first peers keep (what the router sent to
each worker, never told of engine evictions), held as the set of canonical block hashes sent."""

from __future__ import annotations

from collections.abc import Iterable


def matched_blocks(tree: set[int] | None, hashes: Iterable[int]) -> int:
    """Leading blocks of ``hashes`` that ``tree`` holds (0 for no tree)."""
    if not tree:
        return 0
    k = 0
    for h in hashes:
        if h not in tree:
            break
        k += 1
    return k
