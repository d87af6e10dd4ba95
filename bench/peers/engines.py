"""A bare engine_sim fleet for one peer router: N engines, no agents, no registry.

The engines get exactly the flags :class:`bench.stack_fleet.StackFleet` gives kvroute's engines
(same cache size, block size, latency model, time compression, and the same process layout: one
``engine-sim --engines N`` process, or one process per engine), so a peer row and a kvroute row
differ only in the router. Every process is started here and stopped by its pid.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stack_fleet import FleetSpec
from kvroute.procs import ManagedProcess, read_ready_file


@dataclass(frozen=True)
class EngineInfo:
    """One running engine_sim: its node id, ports and ZMQ endpoints."""

    node_id: str
    ready: dict[str, Any]

    @property
    def url(self) -> str:
        """Base URL of the engine's HTTP API."""
        return f"http://127.0.0.1:{self.ready['http_port']}"

    @property
    def events_endpoint(self) -> str:
        """ZMQ PUB endpoint of its KV events (map encoding)."""
        return f"tcp://127.0.0.1:{self.ready['events_port']}"

    @property
    def replay_endpoint(self) -> str:
        """ZMQ ROUTER endpoint of its KV event replay."""
        return f"tcp://127.0.0.1:{self.ready['replay_port']}"


def engine_args(spec: FleetSpec) -> list[str]:
    """engine_sim flags for ``spec`` (the same as StackFleet's engines)."""
    return spec.engine_args()


@dataclass
class EngineFleet:
    """``start()`` N engines (in parallel), use ``engines``, then ``close()`` (idempotent)."""

    workdir: Path
    spec: FleetSpec
    startup_timeout_s: float = 60.0
    engines: list[EngineInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._procs: list[ManagedProcess] = []

    def start(self) -> EngineFleet:
        """Start every engine, then wait for each ready file."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        per_process = 1 if not self.spec.one_process else self.spec.nodes
        pending: list[tuple[int, Path, ManagedProcess]] = []
        try:
            for first in range(0, self.spec.nodes, per_process):
                name = f"engine-{first}" if per_process == 1 else "engines"
                ready = self.workdir / f"{name}.ready.json"
                ready.unlink(missing_ok=True)
                argv = [sys.executable, "-m", "cli.main", "serve", "engine-sim",
                        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                        "--ready-file", str(ready), "--log-level", "warning",
                        *engine_args(self.spec), "--engines", str(per_process)]
                proc = ManagedProcess(name, argv, logs / f"{name}.log").start()
                self._procs.append(proc)
                pending.append((first, ready, proc))
            for first, ready, proc in pending:
                info = read_ready_file(ready, self.startup_timeout_s, proc)
                for k, entry in enumerate(info["engines"]):
                    self.engines.append(EngineInfo(f"engine-{first + k}", entry))
        except BaseException:
            self.close()
            raise
        return self

    @property
    def urls(self) -> dict[str, str]:
        """node id → base URL."""
        return {e.node_id: e.url for e in self.engines}

    def close(self) -> None:
        """Stop every engine this fleet started, by pid."""
        for proc in reversed(self._procs):
            proc.stop(grace_s=5.0)
        self._procs.clear()

    def __enter__(self) -> EngineFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
