"""What the router hears late: a request's end reaches it ``--complete-lag-s`` after the engine
finished (the response's trip back and the ``Complete`` call), in both replays
(:mod:`bench.sim.replay`, :mod:`bench.sim.pd_replay`)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LateNews(Generic[T]):
    """Events heard ``lag_s`` model seconds after they happened, in the order they are heard;
    at one instant in request order (the trace's), then in the order they were told. With
    ``lag_s`` <= 0 an event is heard as it is told."""

    def __init__(self, lag_s: float, hear: Callable[[float, T], None]) -> None:
        self.lag_s = lag_s
        self._hear = hear
        """Called with the time the event is heard and the event."""
        self._heap: list[tuple[float, int, int, T]] = []
        self._told = itertools.count()

    def tell(self, at: float, request: int, event: T, lag_s: float | None = None) -> None:
        """``event`` of request number ``request`` happened at ``at``; heard ``lag_s`` later
        when given (a stack run's measured lag for this request), else ``self.lag_s``."""
        lag = self.lag_s if lag_s is None else lag_s
        if lag <= 0:
            self._hear(at, event)
            return
        heapq.heappush(self._heap, (at + lag, request, next(self._told), event))

    def hear_until(self, now: float) -> None:
        """Hear every event due by ``now`` (``math.inf``: all of them)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, _, event = heapq.heappop(heap)
            self._hear(at, event)
