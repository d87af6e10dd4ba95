"""A stack run's measured timing per request, replayed by :func:`bench.sim.replay.simulate`.

A request in ``--mode stack`` has three moments the sim must place on its virtual clock:

- the router's **decision** (the gateway decides, then forwards): not recorded by anything;
- its **arrival at the engine** (the engine's own record, as a lag behind the schedule):
  :attr:`RequestTiming.engine_lag_s`;
- the router **hearing it completed** (the response's trip back and the ``Complete`` call, as a
  lag behind the engine's finish): :attr:`RequestTiming.return_lag_s`.

The replay submits each request to its engine at the measured arrival and lets the router hear
of it at the measured return. The decision falls somewhere between the schedule and the engine
arrival (the client sends on schedule; parsing and hashing in the gateway, the forward and
parsing in the engine make up the rest, in a proportion nothing measures), so each seed draws
that point uniformly per request: the seeds' spread is the part of the stack's timing the
records do not pin down. Decisions keep the trace's order (the client sends in it and the
gateway decides in arrival order).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.workloads.base import Workload


@dataclass(frozen=True)
class RequestTiming:
    """Measured lags per request, in request order (model seconds; NaN = not measured)."""

    engine_lag_s: Sequence[float]
    """Engine arrival minus the request's schedule (NaN: no engine recorded it; then 0)."""
    return_lag_s: Sequence[float] = field(default=())
    """Engine finish to the client having the response (empty or NaN: the sim's
    ``complete_lag_s``)."""

    def check(self, n_requests: int) -> None:
        """ValueError unless the lists cover ``n_requests`` requests."""
        if len(self.engine_lag_s) != n_requests:
            raise ValueError(f"{len(self.engine_lag_s)} engine lags for {n_requests} requests")
        if self.return_lag_s and len(self.return_lag_s) != n_requests:
            raise ValueError(f"{len(self.return_lag_s)} return lags for {n_requests} requests")

    def engine_lag(self, i: int) -> float:
        """Request ``i``'s engine lag (0 when not measured)."""
        lag = self.engine_lag_s[i]
        return max(0.0, lag) if math.isfinite(lag) else 0.0

    def return_lag(self, i: int, default: float) -> float:
        """Request ``i``'s return lag (``default`` when not measured)."""
        if not self.return_lag_s:
            return default
        lag = self.return_lag_s[i]
        return max(0.0, lag) if math.isfinite(lag) else default

    def decision_lags(self, seed: int) -> list[float]:
        """Per request, the decision's lag behind the schedule: a seeded uniform fraction of
        its engine lag (module docstring)."""
        rnd = random.Random(f"decision-point:{seed}")
        return [rnd.random() * self.engine_lag(i) for i in range(len(self.engine_lag_s))]


def arrival_times(workload: Workload, jitter_s: float, seed: int,
                  lags: Sequence[float] | None = None) -> list[float]:
    """Each request's arrival at the router: its scheduled time, plus its lag from ``lags``
    when given (NaN = 0), plus a uniform draw in ``[0, jitter_s)`` (seeded) when ``jitter_s``
    > 0, never before the request scheduled just before it (the trace's order is kept, as the
    stack's client keeps it)."""
    base = [r.arrival_s for r in workload.requests]
    if lags is not None:
        if len(lags) != len(base):
            raise ValueError(f"{len(lags)} arrival lags for {len(base)} requests")
        base = [a + (lag if math.isfinite(lag) else 0.0) for a, lag in zip(base, lags,
                                                                           strict=True)]
    if jitter_s <= 0 and lags is None:
        return base
    rnd = random.Random(f"arrival-jitter:{seed}")
    out: list[float] = []
    last = float("-inf")
    for a in base:  # in order: a client sends a burst in trace order, as the stack's replay does
        last = max(last, a + (rnd.uniform(0.0, jitter_s) if jitter_s > 0 else 0.0))
        out.append(last)
    return out


def request_times(workload: Workload, jitter_s: float, seed: int,
                  timing: RequestTiming | None) -> tuple[list[float], list[float]]:
    """Per request, (its decision time, its arrival at the engine) on the sim's clock: without
    ``timing`` both are :func:`arrival_times` (schedule plus seeded jitter); with a stack run's
    ``timing`` the decision falls at a seeded point between schedule and the measured engine
    arrival (:meth:`RequestTiming.decision_lags`) and the engine arrival is the measured one,
    never before the decision."""
    if timing is None:
        arrivals = arrival_times(workload, jitter_s, seed)
        return arrivals, arrivals
    timing.check(len(workload.requests))
    arrivals = arrival_times(workload, jitter_s, seed, timing.decision_lags(seed))
    return arrivals, [max(a, r.arrival_s + timing.engine_lag(i))
                      for i, (a, r) in enumerate(zip(arrivals, workload.requests, strict=True))]
