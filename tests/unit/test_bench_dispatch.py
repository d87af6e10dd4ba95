"""The stack replays' shared open-loop dispatch (:func:`bench.dispatch.dispatch_open_loop`)."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.dispatch import dispatch_open_loop
from bench.workloads.base import TraceRequest


def _reqs(*arrivals: float) -> list[TraceRequest]:
    return [TraceRequest(f"r{i}", a, (i,), 16, 1) for i, a in enumerate(arrivals)]


async def test_sends_each_request_no_earlier_than_its_scaled_arrival_without_waiting() -> None:
    """Open loop: request 1 starts while request 0 still runs; nothing starts early."""
    reqs = _reqs(0.0, 0.1, 0.2)
    scale = 0.5
    sent: list[float] = [float("nan")] * 3
    done: list[int] = []
    ticks: list[int] = []
    release = asyncio.Event()

    async def send(i: int) -> None:
        sent[i] = time.perf_counter()
        if i == 0:
            await release.wait()  # still running when the others are sent
        done.append(i)
        if i == 2:
            release.set()

    start = time.perf_counter()
    await dispatch_open_loop(reqs, scale, send, ticks.append, start)
    for i, r in enumerate(reqs):
        assert sent[i] - start >= r.arrival_s * scale - 1e-3
    assert sent[0] <= sent[1] <= sent[2]
    assert done == [1, 2, 0]  # 0 was still running when 1 and 2 were sent
    assert ticks == [1, 1, 1]  # one progress step per finished request


async def test_a_failing_request_raises_and_the_others_still_finish() -> None:
    finished: list[int] = []
    both = asyncio.Event()

    async def send(i: int) -> None:
        if i == 0:
            raise RuntimeError("boom")
        await asyncio.sleep(0.01)
        finished.append(i)
        if len(finished) == 2:
            both.set()

    with pytest.raises(RuntimeError, match="boom"):
        await dispatch_open_loop(_reqs(0.0, 0.0, 0.0), 1.0, send)
    await asyncio.wait_for(both.wait(), 10)  # not cancelled by the failure
    assert sorted(finished) == [1, 2]
