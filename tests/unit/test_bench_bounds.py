"""Hit-rate bounds (engine rule) and the shared-queue latency floor."""

from __future__ import annotations

import pytest

from bench.bounds import latency_floor, merged_lru, oracle
from bench.workloads.base import TraceRequest, Workload

BS = 16


def _req(i: int, t: float, hashes: tuple[int, ...], prompt: int | None = None) -> TraceRequest:
    return TraceRequest(f"r{i}", t, hashes, len(hashes) * BS if prompt is None else prompt, 4)


def test_bounds_follow_the_engine_rule() -> None:
    # r1 repeats r0 exactly: the engine computes at least one token, so the last full block is
    # recomputed; a trailing partial block (r2's id 9) is never cached
    wl = Workload("t", BS, [_req(0, 0.0, (1, 2, 3)), _req(1, 1.0, (1, 2, 3)),
                            _req(2, 2.0, (1, 2, 9), prompt=2 * BS + 5),
                            _req(3, 3.0, (1, 2, 9), prompt=2 * BS + 5)])
    assert oracle(wl).cached_tokens == [0, 2 * BS, 2 * BS, 2 * BS]
    assert merged_lru(wl, 100).cached_tokens == [0, 2 * BS, 2 * BS, 2 * BS]
    # a 2-block cache keeps the prefix, evicting tails first
    small = Workload("s", BS, [_req(0, 0.0, (1, 2, 3, 4)), _req(1, 1.0, (1, 2, 7, 8))])
    assert merged_lru(small, 2).cached_tokens == [0, 2 * BS]


def test_latency_floor_is_one_fifo_queue_over_n_engines() -> None:
    wl = Workload("t", BS, [_req(i, 0.0, (100 + i,), prompt=1000) for i in range(3)])
    merged = merged_lru(wl, 100)
    one = latency_floor(wl, merged, 1, 1000.0)
    assert one.ttft_s == pytest.approx([1.0, 2.0, 3.0])
    two = latency_floor(wl, merged, 2, 1000.0)
    assert two.ttft_s == pytest.approx([1.0, 1.0, 2.0])  # third starts when the first engine frees
    assert two.utilization == pytest.approx(3.0 / (2 * 2.0))
    assert two.percentiles_ms()["p50"] == pytest.approx(1000.0)
    # hits shorten the prefill exactly as much as merged-LRU says
    rep = Workload("r", BS, [_req(0, 0.0, (1, 2, 3), prompt=48), _req(1, 10.0, (1, 2, 3), 48)])
    floor = latency_floor(rep, merged_lru(rep, 100), 1, 16.0)
    assert floor.ttft_s == pytest.approx([3.0, 1.0])
    with pytest.raises(ValueError):
        latency_floor(rep, merged_lru(rep, 100), 0, 16.0)
