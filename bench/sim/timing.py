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
