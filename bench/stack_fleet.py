"""A whole kvroute stack as real processes on loopback: etcd, registry, router, engines, agents.

Used by ``kvroute demo`` and ``kvroute bench --mode stack``. Every process is started by this
object and stopped by its pid (never by name); ``close()`` is safe to call twice and runs on
Ctrl-C. Ports are all free loopback ports chosen at start.
"""

from __future__ import annotations

import dataclasses
import json
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
from kvroute.settings import settings_flags
from router_service.policies.kv_aware import KvAwareSettings


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
    registries: int = 1
    """Registry replicas (router and agents get them all as a comma list)."""
    start_router: bool = True
    """Start ``kvroute serve router`` (the endpoint picker's stack decides in its own process)."""
    gateway: bool = False
    """Also start ``kvroute serve gateway`` (the OpenAI front; same routing flags as the
    router)."""
    gateway_args: tuple[str, ...] = ()
    """Extra gateway flags (e.g. ``--no-uvloop``)."""
    routers: int = 1
    """Router replicas (issue 19: several pods behind a Service; each gets
    ``--router-replica-id router-K``; share their view when ``router_args`` say
    ``--share-routes``)."""
    gateways: int = 1
    """Gateway replicas when ``gateway`` is set (ids ``gateway-K``)."""
    one_process: bool = True
    """All engines in one ``engine-sim --engines N`` process and all agents in one ``agent
    --fleet-file`` process (each engine still has its own HTTP, ZMQ and metrics ports, each agent
    its own subscription and registry link): 2 processes instead of 2N, so the fleet's own CPU
    use and scheduling no longer move the measured latencies. False = a process per engine and
    per agent, as deployed."""
    roles: tuple[str, ...] = ()
    """Disaggregated fleets: each engine's role (prefill/decode/both; its agent registers it and
    its node id is ``ROLE-i``); empty = every engine ``both`` (``engine-i``)."""
    transfer_ms_per_block: float = 2.0 / 512 * DEFAULT_BLOCK_SIZE
    """Model milliseconds a decode engine takes to receive one KV block."""

    def node_id(self, i: int) -> str:
        """Node id of engine ``i``."""
        return f"{self.roles[i]}-{i}" if self.roles else f"engine-{i}"

    def engine_args(self) -> list[str]:
        """``kvroute serve engine-sim`` flags of one engine of this fleet (shape and speed)."""
        return ["--block-size", str(self.block_size), "--capacity-blocks", str(self.cache_blocks),
                "--prefill-tokens-per-s", str(self.prefill_tokens_per_s),
                "--decode-ms-per-token", str(self.decode_ms_per_token),
                "--max-running", str(self.max_running), "--time-scale", str(self.time_scale),
                "--model", self.model, "--max-prompt-tokens", str(self.max_prompt_tokens),
                "--transfer-ms-per-block", str(self.transfer_ms_per_block)]


@dataclass
class EngineHandle:
    """One engine_sim process, its agent and their ports."""

    node_id: str
    engine: ManagedProcess
    """The engine's process (shared by every engine of a one-process fleet)."""
    agent: ManagedProcess
    """The agent's process (shared likewise)."""
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
        """Registry 0 (``registries`` holds every replica)."""
        self.registries: list[ManagedProcess] = []
        self.registries_ready: list[dict[str, Any]] = []
        self._restarts = 0
        self.router: ManagedProcess | None = None
        """Router 0 (``routers`` holds every replica)."""
        self.routers: list[ManagedProcess] = []
        self.routers_ready: list[dict[str, Any]] = []
        self.gateways: list[ManagedProcess] = []
        self.gateways_ready: list[dict[str, Any]] = []
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
    def registry_list(self) -> str:
        """Every registry replica as a comma list (what router and agents are given)."""
        return ",".join(f"127.0.0.1:{r['grpc_port']}" for r in self.registries_ready)

    def _registry_args(self, port: int = 0) -> list[str]:
        assert self.etcd is not None
        return ["--etcd-endpoints", self.etcd.endpoint, "--block-size",
                str(self.spec.block_size), "--lease-ttl-s", str(self.spec.lease_ttl_s),
                "--listen", f"127.0.0.1:{port}"]

    def stop_registry(self, i: int, kill: bool) -> None:
        """SIGKILL (crash) or SIGTERM (drain, waited for) registry ``i``."""
        proc = self.registries[i]
        if kill:
            proc.kill()
        else:
            proc.stop(grace_s=10.0)

    def restart_registry(self, i: int) -> None:
        """Start registry ``i`` again on its port and wait until it serves."""
        self._restarts += 1
        port = int(self.registries_ready[i]["grpc_port"])
        launched = self._launch("registry", f"registry-{i}-r{self._restarts}",
                                self._registry_args(port))
        self.registries[i], self.registries_ready[i] = launched[0], self._ready(launched)
        if i == 0:
            self.registry = self.registries[0]

    def _start_registries(self) -> None:
        launched = [self._launch("registry", "registry" if i == 0 else f"registry-{i}",
                                 self._registry_args()) for i in range(self.spec.registries)]
        self.registries = [r[0] for r in launched]
        self.registries_ready = [self._ready(r) for r in launched]
        self.registry, self.registry_ready = self.registries[0], self.registries_ready[0]

    @property
    def router_target(self) -> str:
        """``127.0.0.1:PORT`` of the router (replica 0)."""
        return f"127.0.0.1:{self.router_ready['grpc_port']}"

    @property
    def router_targets(self) -> list[str]:
        """``127.0.0.1:PORT`` of every router replica."""
        return [f"127.0.0.1:{r['grpc_port']}" for r in self.routers_ready]

    def start(self) -> StackFleet:
        """Start every process (independent ones in parallel) and wait until all serve."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        s = self.spec
        try:
            self.etcd = EmbeddedEtcd(self.workdir / "etcd").start()
            if s.one_process:
                self._start_one_process()
            else:
                self._start_per_node()
        except BaseException:
            self.close()
            raise
        return self

    def _routing_args(self) -> list[str]:
        s = self.spec
        return ["--registry", self.registry_list, "--block-size", str(s.block_size),
                "--default-policy", s.default_policy, "--default-model", s.model,
                "--kv-prefill-tokens-per-s", str(s.prefill_tokens_per_s / s.time_scale),
                "--max-prompt-tokens", str(s.max_prompt_tokens), *s.router_args]

    @staticmethod
    def _name(role: str, k: int) -> str:
        return role if k == 0 else f"{role}-{k}"

    def _router(self) -> list[tuple[ManagedProcess, Path]]:
        if not self.spec.start_router:
            return []
        return [self._launch("router", self._name("router", k),
                             [*self._routing_args(), "--router-replica-id", f"router-{k}"])
                for k in range(self.spec.routers)]

    def _router_ready(self, launched: list[tuple[ManagedProcess, Path]]) -> None:
        if launched:
            self.routers = [r[0] for r in launched]
            self.routers_ready = [self._ready(r) for r in launched]
            self.router, self.router_ready = self.routers[0], self.routers_ready[0]

    def _gateway(self) -> list[tuple[ManagedProcess, Path]]:
        """``kvroute serve gateway`` with the router's routing flags (``spec.gateway``)."""
        s = self.spec
        if not s.gateway:
            return []
        return [self._launch("gateway", self._name("gateway", k), [
            *self._routing_args(), "--router-replica-id", f"gateway-{k}",
            "--max-concurrent-requests", "65536",
            "--max-body-bytes", str(64 * 1024 * 1024), *s.gateway_args])
            for k in range(s.gateways)]

    def _gateway_ready(self, launched: list[tuple[ManagedProcess, Path]]) -> None:
        if launched:
            self.gateways = [g[0] for g in launched]
            self.gateways_ready = [self._ready(g) for g in launched]
            self.gateway_ready = self.gateways_ready[0]

    def restart_fronts(self) -> None:
        """Stop every router and gateway replica and start them again (fresh routing state:
        in-flight counts, kv_aware's recent routes and averages, the shared view)."""
        old = [*self.routers, *self.gateways]
        for proc in old:  # SIGTERM all first, so they drain in parallel
            proc.signal(signal.SIGTERM)
        for proc in old:
            proc.stop(grace_s=5.0)
            self._procs.remove(proc)
        router, gateway = self._router(), self._gateway()
        self._router_ready(router)
        self._gateway_ready(gateway)

    @property
    def gateway_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the gateway (``spec.gateway``; replica 0)."""
        if not self.gateway_ready:
            raise RuntimeError("this fleet runs no gateway (FleetSpec.gateway=False)")
        return f"http://127.0.0.1:{self.gateway_ready['http_port']}"

    @property
    def gateway_urls(self) -> list[str]:
        """``http://127.0.0.1:PORT`` of every gateway replica."""
        return [f"http://127.0.0.1:{g['http_port']}" for g in self.gateways_ready]

    def _start_per_node(self) -> None:
        s = self.spec
        engines = [self._launch("engine-sim", f"engine-{i}", s.engine_args())
                   for i in range(s.nodes)]
        self._start_registries()
        engine_ready = [self._ready(e) for e in engines]
        agents = [self._launch("agent", f"agent-{i}", [*self._shared_agent_args(),
                                                       *_agent_flags(self._agent_entry(i, r))])
                  for i, r in enumerate(engine_ready)]
        router, gateway = self._router(), self._gateway()
        for i, (agent, ready) in enumerate(zip(agents, engine_ready, strict=True)):
            self._ready(agent)
            self.engines.append(EngineHandle(s.node_id(i), engines[i][0], agent[0], ready))
        self._router_ready(router)
        self._gateway_ready(gateway)

    def _start_one_process(self) -> None:
        s = self.spec
        launched = self._launch("engine-sim", "engines", [*s.engine_args(),
                                                          "--engines", str(s.nodes)])
        self._start_registries()
        engine_ready = list(self._ready(launched)["engines"])
        fleet_file = self.workdir / "agents.json"
        fleet_file.write_text(json.dumps(
            [self._agent_entry(i, r) for i, r in enumerate(engine_ready)], indent=1))
        agents = self._launch("agent", "agents", [*self._shared_agent_args(),
                                                  "--fleet-file", str(fleet_file)])
        router, gateway = self._router(), self._gateway()
        self._ready(agents)
        self.engines = [EngineHandle(s.node_id(i), launched[0], agents[0], r)
                        for i, r in enumerate(engine_ready)]
        self._router_ready(router)
        self._gateway_ready(gateway)

    def _shared_agent_args(self) -> list[str]:
        s = self.spec
        return ["--registry", self.registry_list, "--model", s.model,
                "--block-size", str(s.block_size),
                "--heartbeat-interval-s", str(s.heartbeat_interval_s)]

    def _agent_entry(self, i: int, ready: dict[str, Any]) -> dict[str, Any]:
        http = f"http://127.0.0.1:{ready['http_port']}"
        entry: dict[str, Any] = {
            "node_id": self.spec.node_id(i), "engine_url": http,
            "engine_metrics_url": f"{http}/metrics",
            "engine_events": f"tcp://127.0.0.1:{ready['events_port']}",
            "engine_replay": f"tcp://127.0.0.1:{ready['replay_port']}",
            "capacity_blocks": self.spec.cache_blocks}
        if self.spec.roles:
            entry["role"] = self.spec.roles[i]
        return entry

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


def _agent_flags(entry: dict[str, Any]) -> list[str]:
    """A fleet-file entry as ``kvroute serve agent`` flags (one agent per process)."""
    out: list[str] = []
    for key, value in entry.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def router_flags(kv: KvAwareSettings, time_scale: float) -> tuple[str, ...]:
    """Router flags giving it ``kv`` (stated in model time, as ``--mode sim`` uses them) on
    engines whose clock runs ``1 / time_scale`` times faster than the wall clock.

    The router lives on the wall clock: its queued-prefill estimate drains in wall seconds and the
    registry's eviction rates are per wall second. So the prefill rate it believes is the model
    rate / ``time_scale``, the usage penalty (seconds) scales by ``time_scale``, and the eviction
    cost (seconds per eviction/s) by ``time_scale``²; every other setting is unitless or a count.
    Then every kv_aware estimate is the model-time estimate x ``time_scale``, and the router
    ranks nodes exactly as it would in front of real-time engines.
    """
    scaled = dataclasses.replace(
        kv, kv_prefill_tokens_per_s=kv.kv_prefill_tokens_per_s / time_scale,
        kv_usage_penalty_s=kv.kv_usage_penalty_s * time_scale,
        kv_eviction_cost_s=kv.kv_eviction_cost_s * time_scale ** 2)
    return settings_flags(scaled)
