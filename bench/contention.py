"""Was a stack replay bound by CPU contention? Load, CPU use and the replay's own timing.

A stack replay runs on the wall clock, so a machine busy with other work delays requests on
their way to the engines and the figures stop measuring the router alone. Every replay records
the machine's load average and CPU use while it ran (:class:`MachineSampler`), and the replay
measures how far behind the trace's schedule requests reached their engines (arrival lag). A
run whose arrival lag p99 exceeds :data:`CONTENTION_LAG_P99_S` of trace time is reported as
**contention-bound** — in its table row, the JSON and the run-to-run spread — never dropped:
the same rule for kvroute and every peer router.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CONTENTION_LAG_P99_S = 1.0
"""Arrival lag p99 (trace seconds) above which a replay is contention-bound: at the default 5x
compression 0.2 s of wall time, an order of magnitude above a quiet machine's 0.1-0.4 s in
trace time, and a sixth of the sample's latency floor p90 (5.35 s)."""


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat (None where unreadable)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    vals = [int(v) for v in first[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already in user/nice
    return total - idle, total


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


class MachineSampler:
    """Load average and CPU use over one replay: ``start()`` before it, ``stop()`` after."""

    def __init__(self) -> None:
        self._cpu0: tuple[int, int] | None = None
        self._load0 = float("nan")

    def start(self) -> None:
        """Remember the counters at the replay's start."""
        self._cpu0 = _cpu_times()
        self._load0 = _load1()

    def stop(self) -> tuple[tuple[float, float], float | None]:
        """((load at start, load now), busy fraction of all CPU time since ``start``)."""
        cpu1 = _cpu_times()
        busy = None
        if self._cpu0 is not None and cpu1 is not None and cpu1[1] > self._cpu0[1]:
            busy = (cpu1[0] - self._cpu0[0]) / (cpu1[1] - self._cpu0[1])
        return (round(self._load0, 2), round(_load1(), 2)), \
            None if busy is None else round(busy, 3)


def contention_bound(row: dict[str, Any]) -> bool:
    """True when a result row's arrival lag p99 says its replay could not keep the trace's
    timing (only stack rows have an arrival lag)."""
    lag = row.get("arrival_lag_ms")
    return lag is not None and float(lag["p99"]) / 1000.0 > CONTENTION_LAG_P99_S
