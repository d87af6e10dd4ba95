"""Routing-independent references of a workload: hit-rate bounds and the latency floor (DESIGN §8).

* oracle — one infinite cache: every block ever seen is reusable;
* merged-capacity LRU — one LRU cache as large as the whole fleet (nodes x blocks per node),
  the fair ceiling when caches are finite (no router can beat one shared cache of the same total
  size with the same LRU policy, short of predicting the future);
* latency floor — the same N engines behind ONE shared FIFO queue, every request getting the
  merged-LRU hit: a request starts its prefill on the first engine to come free, and takes
  uncached tokens / prefill rate there. Per-node queues can only lose against it (a request
  waits behind its node's queue while another engine idles, or misses a prefix the shared cache
  would have had), so every policy's TTFT reads as a ratio to it;
* random — the ``random`` policy's engine-measured hit rate (computed by the replay itself).

All use the engines' rule (engine_sim, vLLM): only a prompt's full blocks are cached, the
reusable part is the longest cached prefix of them, and at least one prompt token is always
computed.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from bench.workloads.base import TraceRequest, Workload


@dataclass(frozen=True)
class Bound:
    """A bound's hit rate and its per-request cached tokens (for the running-hit-rate plot)."""

    hit_rate_tokens: float
    cached_tokens: list[int]


@dataclass(frozen=True)
class LatencyFloor:
    """TTFT of every request when N engines share one FIFO queue and the merged-LRU cache."""

    nodes: int
    prefill_tokens_per_s: float
    ttft_s: list[float]
    utilization: float
    """Prefill busy time / (nodes x span): the fleet's load at the floor."""

    def percentiles_ms(self) -> dict[str, float]:
        """``{"p50", "p90", "p99"}`` in milliseconds (the shape of a result's ``ttft_ms``)."""
        if not self.ttft_s:
            return {"p50": math.nan, "p90": math.nan, "p99": math.nan}
        s = sorted(self.ttft_s)
        return {k: round(1000.0 * _pct(s, q), 1) for k, q in (("p50", 50), ("p90", 90),
                                                               ("p99", 99))}


def _pct(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), on sorted values."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def engine_blocks(r: TraceRequest, block_size: int) -> tuple[Sequence[int], int]:
    """The request's cacheable block ids (full blocks) and how many of them may be reused."""
    full = r.prompt_tokens // block_size
    ids = r.block_hashes if len(r.block_hashes) <= full else r.block_hashes[:full]
    return ids, min(len(ids), max(r.prompt_tokens - 1, 0) // block_size)


def oracle(workload: Workload) -> Bound:
    """One infinite cache."""
    seen: set[int] = set()
    cached: list[int] = []
    bs = workload.block_size
    for r in workload.requests:
        ids, limit = engine_blocks(r, bs)
        k = 0
        while k < limit and ids[k] in seen:
            k += 1
        cached.append(k * bs)
        seen.update(ids)
    return _bound(workload, cached)


def merged_lru(workload: Workload, capacity_blocks: int) -> Bound:
    """One LRU cache of ``capacity_blocks`` (nodes x per-node capacity)."""
    if capacity_blocks < 1:
        raise ValueError("merged-LRU capacity must be >= 1 block")
    lru: OrderedDict[int, None] = OrderedDict()
    bs = workload.block_size
    cached: list[int] = []
    for r in workload.requests:
        ids, limit = engine_blocks(r, bs)
        k = 0
        while k < limit and ids[k] in lru:
            k += 1
        cached.append(k * bs)
        for h in reversed(ids):  # block 0 ends most recent: tails are evicted first
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                if len(lru) > capacity_blocks:
                    lru.popitem(last=False)
    return _bound(workload, cached)


def latency_floor(workload: Workload, merged: Bound, nodes: int,
                  prefill_tokens_per_s: float) -> LatencyFloor:
    """TTFT with one FIFO queue in front of ``nodes`` prefill units and ``merged``'s hits.

    No batch or cache-admission limits and no decode cost before the first token: it is a floor.
    """
    if nodes < 1 or prefill_tokens_per_s <= 0:
        raise ValueError("latency floor needs nodes >= 1 and a prefill rate > 0")
    free_at = [0.0] * nodes  # a min-heap of the times each engine's prefill unit comes free
    ttft: list[float] = []
    busy = 0.0
    end = 0.0
    for r, cached in zip(workload.requests, merged.cached_tokens, strict=True):
        dur = max(0, r.prompt_tokens - cached) / prefill_tokens_per_s
        start = max(r.arrival_s, free_at[0])
        done = start + dur
        heapq.heapreplace(free_at, done)
        ttft.append(done - r.arrival_s)
        busy += dur
        end = max(end, done)
    t0 = workload.requests[0].arrival_s if workload.requests else 0.0
    span = max(1e-9, end - t0)
    return LatencyFloor(nodes, prefill_tokens_per_s, ttft, busy / (nodes * span))


def _bound(workload: Workload, cached: list[int]) -> Bound:
    total = sum(r.prompt_tokens for r in workload.requests)
    return Bound(sum(cached) / total if total else 0.0, cached)
