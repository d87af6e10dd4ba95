"""The open-loop dispatch loop every stack replay shares.

Each request starts at its trace arrival time compressed by ``time_scale`` (wall seconds =
model seconds x ``time_scale``, on :func:`time.perf_counter` from ``start``), whether or not
earlier ones have finished — an open loop, as a fleet's clients send. What a request measures
(client time, arrival skew from the engines' records) is up to the caller's ``send``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from bench.workloads.base import TraceRequest


async def dispatch_open_loop(requests: Sequence[TraceRequest], time_scale: float,
                             send: Callable[[int], Coroutine[Any, Any, None]],
                             progress: Callable[[int], None] | None = None,
                             start: float | None = None) -> None:
    """Start ``send(i)`` at ``start + requests[i].arrival_s * time_scale`` for every ``i`` in
    order, then wait for all of them.

    ``send(i)`` is called (its coroutine made) at dispatch time, in arrival order.
    ``progress(1)`` is called as each request finishes. ``start``: the
    :func:`time.perf_counter` instant arrival 0 maps to (now when not given; pass it when the
    requests or something running next to them need it). The first exception a request raises
    is raised here once it happens (the other requests keep running), as
    :func:`asyncio.gather` does.
    """
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter() if start is None else start
    for i, req in enumerate(requests):
        delay = req.arrival_s * time_scale - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send(i))
        if progress is not None:
            task.add_done_callback(lambda _t: progress(1))
        tasks.append(task)
    await asyncio.gather(*tasks)
