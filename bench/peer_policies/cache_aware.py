"""What sglang-router's ``cache_aware`` and its fork's, vllm-router's, share: the three
thresholds with their defaults, the balance check that turns prefix matching off, and the
per-worker approximate prefix tree's match (what the router sent to each worker, never told of
engine evictions), held as the set of canonical block hashes sent."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheAwareThresholds:
    """The thresholds of both routers' ``cache_aware``, at their defaults."""

    cache_threshold: float = 0.3
    """``--cache-threshold``: the least prefix match rate that routes by prefix."""
    balance_abs_threshold: int = 64
    """``--balance-abs-threshold``: loads further apart than this may turn prefix matching off."""
    balance_rel_threshold: float = 1.5
    """``--balance-rel-threshold``: ... when the highest is also over this times the lowest."""

    def imbalanced(self, loads: Sequence[int]) -> tuple[bool, int, int]:
        """Whether the workers' loads are too far apart for prefix matching (``max - min`` over
        the absolute and ``max`` over the relative threshold), with that max and min."""
        hi, lo = max(loads), min(loads)
        return (hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold,
                hi, lo)


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
