"""A whole kvroute stack as real processes on loopback: etcd, registry, router, engines, agents.

Used by ``kvroute demo`` and ``kvroute bench --mode stack``. Every process is started by this
object and stopped by its pid (never by name); ``close()`` is safe to call twice and runs on
Ctrl-C. Ports are all free loopback ports chosen at start.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_sim.params import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CAPACITY_BLOCKS,
    DEFAULT_DECODE_S_PER_TOKEN,
    DEFAULT_MAX_RUNNING,
    DEFAULT_PREFILL_TOKENS_PER_S,
)
from kvroute.embedded_etcd import EmbeddedEtcd
from kvroute.procs import ManagedProcess, read_ready_file


@dataclass(frozen=True)
class FleetSpec:
    """Shape of the simulated fleet."""

    nodes: int = 4
    """Engines (each with a node agent)."""
    cache_blocks: int = DEFAULT_CAPACITY_BLOCKS
    """KV capacity per engine, in blocks."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per block, the same for engines, agents, registry and router."""
    model: str = "sim-model"
    """Model name every engine serves."""
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    """Engine prefill speed (simulated time)."""
    decode_ms_per_token: float = DEFAULT_DECODE_S_PER_TOKEN * 1000.0
    """Engine decode time per output token (simulated time)."""
    max_running: int = DEFAULT_MAX_RUNNING
    """Batch limit per engine (requests admitted at once)."""
    time_scale: float = 0.05
    """Wall seconds per simulated second (0.05 = 20x faster than real time)."""
    lease_ttl_s: int = 5
    """Registry lease TTL."""
    heartbeat_interval_s: float = 0.05
    """Agent heartbeat interval."""
    default_policy: str = "kv_aware"
    """Router default policy."""
    router_args: tuple[str, ...] = ()
    """Extra router flags (e.g. the kv_aware settings of a bench run)."""
    max_prompt_tokens: int = 262_144
    """Largest prompt the router and engines accept (trace prompts reach ~100k tokens)."""
    gateway: bool = False
    """Also start ``kvroute serve gateway`` (the OpenAI front; same routing flags as the
    router)."""
    gateway_args: tuple[str, ...] = ()
    """Extra gateway flags (e.g. ``--no-uvloop``)."""


@dataclass
class EngineHandle:
    """One engine_sim process, its agent and their ports."""

    node_id: str
    engine: ManagedProcess
    agent: ManagedProcess
    ready: dict[str, Any]

    @property
    def url(self) -> str:
        """Base URL of the engine's OpenAI-compatible API."""
        return f"http://127.0.0.1:{self.ready['http_port']}"


@dataclass
class StackFleet:
    """Start with :meth:`start`, use ``router_target`` and ``engines``, then :meth:`close`."""

    workdir: Path
    spec: FleetSpec = field(default_factory=FleetSpec)
    startup_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.etcd: EmbeddedEtcd | None = None
        self.registry: ManagedProcess | None = None
        self.router: ManagedProcess | None = None
        self.engines: list[EngineHandle] = []
        self.registry_ready: dict[str, Any] = {}
        self.router_ready: dict[str, Any] = {}
        self.gateway_ready: dict[str, Any] = {}
        self._procs: list[ManagedProcess] = []

    # -- process helpers -------------------------------------------------------------------
    def _launch(self, role: str, name: str, args: list[str]) -> tuple[ManagedProcess, Path]:
        """Start ``kvroute serve ROLE`` without waiting; returns it and its ready file."""
        ready = self.workdir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "cli.main", "serve", role, "--listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0", "--ready-file", str(ready),
                "--log-level", "warning", *args]
        proc = ManagedProcess(name, argv, self.workdir / "logs" / f"{name}.log").start()
        self._procs.append(proc)
        return proc, ready

    def _ready(self, launched: tuple[ManagedProcess, Path]) -> dict[str, Any]:
        proc, ready = launched
        return read_ready_file(ready, self.startup_timeout_s, proc)

    @property
    def registry_target(self) -> str:
        """``127.0.0.1:PORT`` of the registry."""
        return f"127.0.0.1:{self.registry_ready['grpc_port']}"

    @property
    def router_target(self) -> str:
        """``127.0.0.1:PORT`` of the router."""
        return f"127.0.0.1:{self.router_ready['grpc_port']}"

    @property
    def gateway_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the gateway (``spec.gateway``)."""
        if not self.gateway_ready:
            raise RuntimeError("this fleet runs no gateway (FleetSpec.gateway=False)")
        return f"http://127.0.0.1:{self.gateway_ready['http_port']}"

    def _routing_args(self) -> list[str]:
        s = self.spec
        return ["--registry", self.registry_target, "--block-size", str(s.block_size),
                "--default-policy", s.default_policy, "--default-model", s.model,
                "--kv-prefill-tokens-per-s", str(s.prefill_tokens_per_s),
                "--max-prompt-tokens", str(s.max_prompt_tokens), *s.router_args]

    def start(self) -> StackFleet:
        """Start every process (independent ones in parallel) and wait until all serve."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        s = self.spec
        try:
            self.etcd = EmbeddedEtcd(self.workdir / "etcd").start()
            registry = self._launch("registry", "registry", [
                "--etcd-endpoints", self.etcd.endpoint, "--block-size", str(s.block_size),
                "--lease-ttl-s", str(s.lease_ttl_s)])
            engines = [self._launch("engine-sim", f"engine-{i}", [
                "--block-size", str(s.block_size), "--capacity-blocks", str(s.cache_blocks),
                "--prefill-tokens-per-s", str(s.prefill_tokens_per_s),
                "--decode-ms-per-token", str(s.decode_ms_per_token),
                "--max-running", str(s.max_running), "--time-scale", str(s.time_scale),
                "--model", s.model, "--max-prompt-tokens", str(s.max_prompt_tokens)])
                for i in range(s.nodes)]
            self.registry, self.registry_ready = registry[0], self._ready(registry)
            engine_ready = [self._ready(e) for e in engines]
            agents = [self._launch("agent", f"agent-{i}", self._agent_args(i, ready))
                      for i, ready in enumerate(engine_ready)]
            router = self._launch("router", "router", self._routing_args())
            gateway = self._launch("gateway", "gateway", [
                *self._routing_args(), "--max-concurrent-requests", "65536",
                "--max-body-bytes", str(64 * 1024 * 1024), *s.gateway_args]) if s.gateway else None
            for i, (agent, ready) in enumerate(zip(agents, engine_ready, strict=True)):
                self._ready(agent)
                self.engines.append(EngineHandle(f"engine-{i}", engines[i][0], agent[0], ready))
            self.router, self.router_ready = router[0], self._ready(router)
            if gateway is not None:
                self.gateway_ready = self._ready(gateway)
        except BaseException:
            self.close()
            raise
        return self

    def _agent_args(self, i: int, ready: dict[str, Any]) -> list[str]:
        s = self.spec
        http = f"http://127.0.0.1:{ready['http_port']}"
        return [
            "--registry", self.registry_target, "--node-id", f"engine-{i}",
            "--engine-url", http, "--engine-metrics-url", f"{http}/metrics",
            "--engine-events", f"tcp://127.0.0.1:{ready['events_port']}",
            "--engine-replay", f"tcp://127.0.0.1:{ready['replay_port']}",
            "--model", s.model, "--block-size", str(s.block_size),
            "--capacity-blocks", str(s.cache_blocks),
            "--heartbeat-interval-s", str(s.heartbeat_interval_s)]

    def close(self) -> None:
        """Stop every process this fleet started (reverse order), then etcd."""
        for proc in reversed(self._procs):  # SIGTERM all first, so they drain in parallel
            proc.signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            proc.stop(grace_s=5.0)
        self._procs.clear()
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None

    def __enter__(self) -> StackFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self) -> str:
        """The last log lines of every process (for error reports)."""
        parts = [f"--- {p.name} ---\n{p.tail(15)}" for p in self._procs]
        return "\n".join(parts)

    def wait_for(self, seconds: float) -> None:
        """Sleep (kept as a method so replays can be written against a fake clock)."""
        time.sleep(seconds)
