"""A small real stack for fault tests: private etcd, 1-2 registries, engine_sim + agent pairs,
one router; and a traffic loop that records every Route's outcome.

Every process is started here and stopped by its pid. Registries listen on fixed free ports so a
restarted one comes back at the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvroute.embedded_etcd import EmbeddedEtcd
from kvroute.procs import free_port
from kvroute.v1 import router_pb2, router_pb2_grpc
from tests.harness import ServerGroup, ServerProcess, wait_serving

BS = 16
MODEL = "sim-model"
TTL = 5
HB = 0.3


def prompt(i: int, blocks: int = 6) -> list[int]:
    """A prompt of ``blocks`` full blocks, distinct per ``i``."""
    return list(range(10_000 * (i + 1), 10_000 * (i + 1) + BS * blocks))


def complete_on(http_port: int, tokens: list[int]) -> None:
    """One completion on an engine (puts the prompt's blocks in its cache)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/completions",
        data=json.dumps({"model": MODEL, "prompt": tokens, "max_tokens": 1}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


@dataclass
class Outcome:
    """One Route call of the traffic loop."""

    t: float
    ok: bool
    node: str = ""
    degraded: bool = False
    matched: int = 0
    want: str = ""
    error: str = ""
    reason: str = ""


@dataclass
class Node:
    """An engine_sim and its agent."""

    node_id: str
    ports: dict[str, int]
    engine: ServerProcess | None = None
    agent: ServerProcess | None = None


@dataclass
class FaultStack:
    """Start with :meth:`start`; :meth:`close` stops everything it started."""

    tmp: Path
    registries: int = 1
    nodes: int = 2
    etcd: EmbeddedEtcd | None = None
    reg_ports: list[int] = field(default_factory=list)
    regs: list[ServerProcess | None] = field(default_factory=list)
    fleet: list[Node] = field(default_factory=list)
    router: ServerProcess | None = None
    _n: int = 0
    procs: ServerGroup = field(init=False)  # every server started, restarts included

    def __post_init__(self) -> None:
        self.procs = ServerGroup(self.tmp)

    @property
    def registry_list(self) -> str:
        """The registries as a comma list."""
        return ",".join(f"127.0.0.1:{p}" for p in self.reg_ports)

    def start(self) -> FaultStack:
        try:
            self.etcd = EmbeddedEtcd(self.tmp / "etcd").start()
            self.reg_ports = [free_port() for _ in range(self.registries)]
            self.regs = [None] * self.registries
            for i in range(self.registries):
                self.start_registry(i)
            for i in range(self.nodes):
                node = Node(f"node-{i}", {"http": free_port(), "events": free_port(),
                                          "replay": free_port()})
                self.fleet.append(node)
                self.start_engine(node)
                self.start_agent(node, i)
            self.router = self.procs.start("router", [
                "--registry", self.registry_list, "--block-size", str(BS),
                "--default-policy", "kv_aware", "--registry-retry-max-s", "0.3"])
            # its ready file comes before its mirror's first snapshot (a Route in between
            # fails UNAVAILABLE and failed the 0-failed-Routes check)
            wait_serving(self.router, 15.0)
        except BaseException:
            self.close()
            raise
        return self

    def start_registry(self, i: int) -> ServerProcess:
        """(Re)start registry ``i`` on its port."""
        self._n += 1
        assert self.etcd is not None
        reg = self.procs.start("registry", [
            "--etcd-endpoints", self.etcd.endpoint, "--lease-ttl-s", str(TTL),
            "--heartbeat-interval-s", str(HB), "--status-write-interval-s", "0.5",
            "--etcd-call-timeout-s", "1", "--drain-timeout-s", "3",
            "--listen", f"127.0.0.1:{self.reg_ports[i]}", "--replica-id", f"reg{i}"],
            name=f"registry{i}-{self._n}")
        self.regs[i] = reg
        return reg

    def start_engine(self, node: Node) -> None:
        """(Re)start a node's engine on its ports."""
        self._n += 1
        p = node.ports
        node.engine = self.procs.start("engine-sim", [
            "--listen", f"127.0.0.1:{p['http']}", "--model", MODEL, "--block-size", str(BS),
            "--capacity-blocks", "400", "--time-scale", "0.01", "--topic", "kv",
            "--events-endpoint", f"tcp://127.0.0.1:{p['events']}",
            "--replay-endpoint", f"tcp://127.0.0.1:{p['replay']}"],
            name=f"{node.node_id}-engine-{self._n}")

    def start_agent(self, node: Node, rotate: int = 0) -> None:
        """Start a node's agent (registry list rotated so agents spread over replicas)."""
        self._n += 1
        p = node.ports
        regs = self.registry_list.split(",")
        k = rotate % len(regs)
        node.agent = self.procs.start("agent", [
            "--registry", ",".join(regs[k:] + regs[:k]), "--node-id", node.node_id,
            "--model", MODEL, "--engine-url", f"http://127.0.0.1:{p['http']}",
            "--capacity-blocks", "400", "--engine-events", f"tcp://127.0.0.1:{p['events']}",
            "--engine-replay", f"tcp://127.0.0.1:{p['replay']}", "--topic", "kv",
            "--rpc-timeout-s", "2"], name=f"{node.node_id}-agent-{self._n}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.procs.stop()  # newest first: router, agents and engines, registries
        if self.etcd is not None:
            self.etcd.stop()

    @property
    def router_target(self) -> str:
        assert self.router is not None
        return self.router.grpc_target


class Traffic:
    """Route → Complete in a loop at ``rate`` per second over ``prompts`` (prompt index →
    the node expected to hold it)."""

    def __init__(self, target: str, prompts: dict[int, str], rate: float = 25.0) -> None:
        self.target = target
        self.prompts = prompts
        self.rate = rate
        self.out: list[Outcome] = []
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            n = 0
            while True:
                prompts = self.prompts  # a test may swap the set
                keys = sorted(prompts)
                i = keys[n % len(keys)]
                want = prompts[i]
                n += 1
                rid = f"t{n}"
                t = time.monotonic()
                try:
                    r = await stub.Route(router_pb2.RouteRequest(
                        request_id=rid, model=MODEL, token_ids=prompt(i)), timeout=3)
                    self.out.append(Outcome(t, True, r.node_id, r.degraded, r.matched_blocks,
                                            want, reason=r.reason))
                    await stub.Complete(router_pb2.CompleteRequest(request_id=rid), timeout=3)
                except grpc.aio.AioRpcError as exc:
                    self.out.append(Outcome(t, False, want=want,
                                            error=f"{exc.code().name}: {exc.details()}"))
                await asyncio.sleep(max(0.0, 1.0 / self.rate - (time.monotonic() - t)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def failures(self) -> list[Outcome]:
        return [o for o in self.out if not o.ok]

    def cache_aware_since(self, t: float) -> float | None:
        """Time of the first decision at or after ``t`` from which on every decision is
        cache-aware (expected node, matched blocks, not degraded); None if never."""
        first: float | None = None
        for o in self.out:
            if o.t < t:
                continue
            good = o.ok and not o.degraded and o.node == o.want and o.matched > 0
            if good and first is None:
                first = o.t
            elif not good:
                first = None
        return first

    async def wait_cache_aware(self, within_s: float) -> float:
        """Wait until decisions are cache-aware; returns when they became so."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < within_s:
            await asyncio.sleep(0.2)
            since = self.cache_aware_since(t0)
            if since is not None and time.monotonic() - since > 0.5:
                return since
        raise AssertionError(f"decisions not cache-aware within {within_s} s: "
                             f"{self.out[-5:]}")

    def summary(self) -> str:
        bad = self.failures()
        deg = sum(o.degraded for o in self.out)
        return (f"{len(self.out)} routes, {len(bad)} failed, {deg} degraded; first failures: "
                f"{[o.error for o in bad[:3]]}")
