"""Hit-rate bounds of a workload, independent of routing (DESIGN §8).

* oracle — one infinite cache: every block ever seen is reusable;
* merged-capacity LRU — one LRU cache as large as the whole fleet (nodes x blocks per node),
  the fair ceiling when caches are finite (no router can beat one shared cache of the same total
  size with the same LRU policy, short of predicting the future);
* random — the ``random`` policy's engine-measured hit rate (computed by the replay itself).

Both bounds use the engines' rule: the reusable part of a prompt is its longest cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.sim.cache import LruBlockCache
from bench.workloads.base import Workload


@dataclass(frozen=True)
class Bound:
    """A bound's hit rate and its per-request cached tokens (for the running-hit-rate plot)."""

    hit_rate_tokens: float
    cached_tokens: list[int]


def oracle(workload: Workload) -> Bound:
    """One infinite cache."""
    seen: set[int] = set()
    cached: list[int] = []
    bs = workload.block_size
    for r in workload.requests:
        k = 0
        for h in r.block_hashes:
            if h not in seen:
                break
            k += 1
        cached.append(r.cached_tokens(k, bs))
        seen.update(r.block_hashes)
    return _bound(workload, cached)


def merged_lru(workload: Workload, capacity_blocks: int) -> Bound:
    """One LRU cache of ``capacity_blocks`` (nodes x per-node capacity)."""
    cache = LruBlockCache(capacity_blocks)
    bs = workload.block_size
    cached: list[int] = []
    for r in workload.requests:
        cached.append(r.cached_tokens(cache.match(r.block_hashes), bs))
        cache.use(r.block_hashes)
    return _bound(workload, cached)


def _bound(workload: Workload, cached: list[int]) -> Bound:
    total = sum(r.prompt_tokens for r in workload.requests)
    return Bound(sum(cached) / total if total else 0.0, cached)
