"""Start and stop stack fleets on helper threads, so the caller computes while processes start.

``kvroute demo`` runs three fleets one after the other. Starting one (~3 s: etcd, registry,
router, gateway, engines and agents, each a Python process importing gRPC) and stopping one
(~1 s) is wall time in which the demo only waits. With :class:`FleetPool` the next fleet starts,
and the last one stops, while the demo replays its in-process sims (virtual clock: the CPU they
share changes no figure). The caller never starts or stops a fleet during a stack replay, whose
figures the machine's load would move.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.stack_backend import StackBackend
from bench.stack_fleet import FleetSpec


@dataclass(frozen=True)
class StartedFleet:
    """A running fleet and how long its start took (wall seconds)."""

    backend: StackBackend
    start_s: float


class FleetPool:
    """Fleets started and stopped in the background; :meth:`close` stops every one of them."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fleet")
        self._pending: list[Future[object]] = []
        self._backends: list[StackBackend] = []

    def start(self, workdir: Path, spec: FleetSpec, front: str = "gateway",
              ) -> Future[StartedFleet]:
        """Start a fleet in the background; the future's result is the running fleet (or the
        start's error, the fleet then stopped)."""
        backend = StackBackend(workdir, spec, front=front)
        self._backends.append(backend)

        def up() -> StartedFleet:
            t0 = time.perf_counter()
            backend.__enter__()
            return StartedFleet(backend, time.perf_counter() - t0)

        future = self._pool.submit(up)
        self._pending.append(future)  # type: ignore[arg-type]
        return future

    def stop(self, backend: StackBackend) -> None:
        """Stop ``backend``'s processes in the background."""
        self._pending.append(self._pool.submit(backend.close))

    def close(self) -> None:
        """Wait for every start and stop under way, then stop every fleet this pool started
        (closing one twice is harmless). Call it in a ``finally``."""
        for future in self._pending:
            with contextlib.suppress(Exception):  # the start already stopped its fleet
                future.result()
        self._pool.shutdown(wait=True)
        for backend in self._backends:
            backend.close()
        self._pending.clear()
        self._backends.clear()

    def __enter__(self) -> FleetPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
