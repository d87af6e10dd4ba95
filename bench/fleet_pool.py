"""Start and stop stack fleets on helper threads, so the caller computes while processes start.

``kvroute demo`` runs three fleets one after the other. Starting one (~3 s: etcd, registry,
router, gateway, engines and agents, each a Python process importing gRPC) and stopping one
(~1 s) is wall time in which the demo only waits. With :class:`FleetPool` the next fleet starts,
and the last one stops, while the demo replays its in-process sims (virtual clock: the CPU they
share changes no figure). Before each stack replay the caller calls :meth:`settle`, so no fleet
starts or stops during a replay, whose figures the machine's load would move.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stack_backend import StackBackend
from bench.stack_fleet import FleetSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartedFleet:
    """A running fleet and how long its start took (wall seconds)."""

    backend: StackBackend
    start_s: float


class FleetPool:
    """Fleets started and stopped in the background; :meth:`close` stops every one of them."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fleet")
        self._pending: list[Future[Any]] = []
        self._backends: list[StackBackend] = []
        self._starts: set[Future[Any]] = set()

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
        self._starts.add(future)
        self._pending.append(future)
        return future

    def stop(self, backend: StackBackend) -> None:
        """Stop ``backend``'s processes in the background."""
        self._pending.append(self._pool.submit(backend.close))

    def settle(self) -> None:
        """Wait until every start and stop under way has finished (call it before a stack
        replay: nothing then starts or stops while it is measured). A start's error is left
        for its future's ``result()``; a failed stop is logged here and retried by
        :meth:`close`, which raises it."""
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.result()
            except Exception:
                if future not in self._starts:
                    log.exception("stopping a fleet failed (retried at close)")

    def close(self) -> None:
        """Wait for every start and stop under way, then stop every fleet this pool started
        (closing one twice is harmless): every fleet is stopped even if one stop fails; the
        first failure is raised at the end. Call it in a ``finally``."""
        errors: list[BaseException] = []
        for future in self._pending:
            with contextlib.suppress(Exception):  # a failed start already stopped its fleet
                future.result()
        self._pool.shutdown(wait=True)
        for backend in self._backends:
            try:
                backend.close()
            except Exception as exc:
                log.exception("stopping a fleet failed")
                errors.append(exc)
        self._pending.clear()
        self._backends.clear()
        self._starts.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> FleetPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
