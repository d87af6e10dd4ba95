"""Fault injection for ``kvroute bench --mode stack --fault SPEC[,SPEC...]``.

A SPEC names a control-plane or node fault and when it happens, in trace seconds (the replay's
clock; wall time = trace time x ``--time-scale``):

| spec | what |
|---|---|
| ``kill-registry@T[+D]`` | SIGKILL registry 0; restart it on the same port D s later (default 2) |
| ``sigterm-registry@T[+D]`` | SIGTERM registry 0 (it drains); restart it D s later (default 1) |
| ``rolling-restart-registries@T`` | SIGTERM + restart each registry in turn (the fleet runs 2) |
| ``pause-etcd@T+D`` | SIGSTOP etcd for D s |
| ``restart-etcd@T+D`` | SIGKILL etcd, start it again (same data) D s later |
| ``kill-engine:NODE@T`` | SIGKILL the engine of NODE (its agent stays) |
| ``kill-agent:NODE@T`` | SIGKILL the agent of NODE (its engine stays) |

The injector runs next to the replay (:meth:`FaultInjector.during`) and afterwards
(:meth:`FaultInjector.summarize`) measures, per run: failed requests, decisions naming a node
that was dead at decision time, blind decisions (made without placement data: ``degraded``),
placements lost (blocks the engines hold that the registry does not index, after recovery) and
the token hit rate of requests routed inside the fault windows, next to the same requests in
a replay of the same policy without faults (run first, on the same fleet: the steady state),
and outside the windows. D and T are trace seconds; restarts wait for the process to serve
(that time counts in the window).
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from bench.results import PolicyRun
from bench.stack_fleet import StackFleet
from kvroute.errors import ConfigError
from kvroute.v1 import registry_pb2, registry_pb2_grpc

KINDS = ("kill-registry", "sigterm-registry", "rolling-restart-registries", "pause-etcd",
         "restart-etcd", "kill-engine", "kill-agent")
_NEEDS_NODE = ("kill-engine", "kill-agent")
_NEEDS_DURATION = ("pause-etcd", "restart-etcd")
_DEFAULT_D = {"kill-registry": 2.0, "sigterm-registry": 1.0}
_SPEC = re.compile(r"^(?P<kind>[a-z-]+)(?::(?P<node>[A-Za-z0-9._:-]+))?"
                   r"@(?P<at>[0-9.]+)(?:\+(?P<dur>[0-9.]+))?$")


@dataclass(frozen=True)
class FaultSpec:
    """One fault: kind, node (engine/agent faults), trace time and duration (seconds)."""

    kind: str
    at_s: float
    duration_s: float = 0.0
    node: str = ""

    def __str__(self) -> str:
        node = f":{self.node}" if self.node else ""
        dur = f"+{self.duration_s:g}" if self.duration_s else ""
        return f"{self.kind}{node}@{self.at_s:g}{dur}"


def parse_faults(text: str) -> list[FaultSpec]:
    """``kill-registry@30,pause-etcd@60+3`` → specs, in time order; ConfigError naming the bad
    entry and the accepted forms otherwise."""
    out: list[FaultSpec] = []
    for raw in (p.strip() for p in text.split(",")):
        m = _SPEC.match(raw)
        if not m or m["kind"] not in KINDS:
            raise ConfigError(f"--fault: cannot read {raw!r}; expected KIND[:NODE]@T[+D] with "
                              f"KIND one of {', '.join(KINDS)} (T, D in trace seconds)")
        kind = m["kind"]
        if (kind in _NEEDS_NODE) != bool(m["node"]):
            raise ConfigError(f"--fault {raw!r}: " + (
                f"{kind} needs a node: {kind}:NODE@T" if kind in _NEEDS_NODE
                else f"{kind} takes no node"))
        if kind in _NEEDS_DURATION and not m["dur"]:
            raise ConfigError(f"--fault {raw!r}: {kind} needs a duration: {kind}@T+D")
        try:
            at = float(m["at"])
            dur = float(m["dur"]) if m["dur"] else _DEFAULT_D.get(kind, 0.0)
        except ValueError:
            raise ConfigError(f"--fault {raw!r}: T and D must be numbers") from None
        out.append(FaultSpec(kind, at, dur, m["node"] or ""))
    return sorted(out, key=lambda f: f.at_s)


def node_faults(specs: Sequence[FaultSpec]) -> bool:
    """True when a fault kills one node's engine or agent (the fleet then runs a process per
    engine and per agent instead of one for all)."""
    return any(f.kind in _NEEDS_NODE for f in specs)


def registries_needed(specs: Sequence[FaultSpec]) -> int:
    """Registries the fleet must run for these faults (a rolling restart needs two)."""
    return 2 if any(f.kind == "rolling-restart-registries" for f in specs) else 1


class Outcome(Protocol):
    """What the stack replay records per request (see bench.stack_replay)."""

    node_id: str
    error: str
    degraded: bool
    t_route_s: float
    """Trace time of the Route call (NaN if never routed)."""


@dataclass
class Window:
    """When a fault was active (trace seconds) and which nodes it made dead."""

    spec: FaultSpec
    start_s: float = math.nan
    end_s: float = math.nan
    dead_node: str = ""
    note: str = ""


@dataclass
class FaultInjector:
    """Injects ``specs`` into a running ``fleet`` during a replay at ``time_scale``."""

    fleet: StackFleet
    specs: list[FaultSpec]
    time_scale: float
    recovery_s: float = 5.0
    """Trace seconds after a fault ends that still count as its window."""
    windows: list[Window] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Fault metrics per replayed policy (filled by :meth:`after`)."""
    replays: int = 2
    """Each policy is replayed without faults first (the baseline), then with them."""
    _baseline: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    _faulting: bool = False

    def _now(self, t0: float) -> float:
        return (time.perf_counter() - t0) / self.time_scale

    async def during(self, t0: float) -> None:
        """Run every fault at its time (``t0`` = the replay's perf_counter start); nothing
        during a policy's baseline replay."""
        if not self._faulting:
            return
        self.windows = []
        for spec in self.specs:
            wait = spec.at_s * self.time_scale - (time.perf_counter() - t0)
            if wait > 0:
                await asyncio.sleep(wait)
            w = Window(spec, start_s=self._now(t0))
            self.windows.append(w)
            await self._inject(spec, w, t0)
            w.end_s = self._now(t0)

    async def _inject(self, spec: FaultSpec, w: Window, t0: float) -> None:
        f, k = self.fleet, spec.kind
        hold = spec.duration_s * self.time_scale
        if k in ("kill-registry", "sigterm-registry"):
            await asyncio.to_thread(f.stop_registry, 0, k == "kill-registry")
            await asyncio.sleep(hold)
            await asyncio.to_thread(f.restart_registry, 0)
        elif k == "rolling-restart-registries":
            for i in range(len(f.registries)):
                await asyncio.to_thread(f.stop_registry, i, False)
                await asyncio.to_thread(f.restart_registry, i)
                await asyncio.sleep(max(1.0, 20 * self.time_scale))  # let clients settle
        elif k == "pause-etcd":
            assert f.etcd is not None and f.etcd.process is not None
            f.etcd.process.signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(hold)
            finally:
                f.etcd.process.signal(signal.SIGCONT)
        elif k == "restart-etcd":
            assert f.etcd is not None
            f.etcd.kill()
            await asyncio.sleep(hold)
            await asyncio.to_thread(f.etcd.start)
        else:
            handle = next((e for e in f.engines if e.node_id == spec.node), None)
            if handle is None:
                w.note = f"no node {spec.node!r} (nodes: {[e.node_id for e in f.engines]})"
                return
            (handle.engine if k == "kill-engine" else handle.agent).kill()
            w.dead_node = spec.node

    @property
    def dead_nodes(self) -> set[str]:
        """Nodes whose engine or agent a fault killed (not restarted)."""
        return {w.dead_node for w in self.windows if w.dead_node}

    def after(self, run: PolicyRun, outcomes: Sequence[Outcome]) -> None:
        """Record a baseline replay, or measure the fault replay of ``run.policy``
        (ReplayHook); the next replay is then the other kind."""
        self._faulting = not self._faulting
        if self._faulting:  # that was the baseline
            self._baseline[run.policy] = (list(run.prompt_tokens), list(run.cached_tokens))
            return
        summary = self.summarize(outcomes, run.prompt_tokens, run.cached_tokens,
                                 self._baseline.get(run.policy))
        self.results[run.policy] = summary
        run.notes.append("faults: " + format_summary(run.policy, summary).strip())

    # -- measurement -------------------------------------------------------------------------
    def in_window(self, t: float) -> bool:
        """True when trace time ``t`` falls in a fault window (plus recovery)."""
        return any(w.start_s <= t <= w.end_s + self.recovery_s for w in self.windows)

    def summarize(self, outcomes: Sequence[Outcome], prompt_tokens: Sequence[int],
                  cached_tokens: Sequence[int],
                  baseline: tuple[list[int], list[int]] | None = None) -> dict[str, Any]:
        """Fault metrics of one replay (see the module docstring); ``baseline`` = prompt and
        cached tokens per request of the same replay without faults."""
        dead = {w.dead_node: w.start_s for w in self.windows if w.dead_node}
        win = [0, 0, 0]  # requests, prompt tokens, cached tokens
        steady = [0, 0, 0]
        base_win = [0, 0]  # the same window's requests without faults: prompt, cached
        failed = naming_dead = blind = 0
        for i, (o, p, c) in enumerate(zip(outcomes, prompt_tokens, cached_tokens,
                                          strict=True)):
            if o.error:
                failed += 1
            t = o.t_route_s
            if o.node_id and o.node_id in dead and not math.isnan(t) and t >= dead[o.node_id]:
                naming_dead += 1
            blind += bool(o.degraded)
            if math.isnan(t):
                continue
            inside = self.in_window(t)
            if inside and baseline is not None:
                base_win[0] += baseline[0][i]
                base_win[1] += baseline[1][i]
            acc = win if inside else steady
            acc[0] += 1
            acc[1] += p
            acc[2] += 0 if o.error else c
        lost = self.placements_lost(set(dead))
        base_all = (sum(baseline[1]) / sum(baseline[0])) if baseline and sum(baseline[0]) \
            else math.nan
        return {
            "faults": [str(s) for s in self.specs],
            "windows": [{"fault": str(w.spec), "start_s": round(w.start_s, 2),
                         "end_s": round(w.end_s, 2), **({"note": w.note} if w.note else {})}
                        for w in self.windows],
            "requests": len(outcomes), "failed": failed,
            "decisions_naming_dead_node": naming_dead,
            "blind_decisions": blind,
            "blind_fraction": blind / len(outcomes) if outcomes else 0.0,
            "placements_lost": lost,
            "hit_rate_fault_window": win[2] / win[1] if win[1] else math.nan,
            "hit_rate_fault_window_without_faults": (
                base_win[1] / base_win[0] if base_win[0] else math.nan),
            "hit_rate_steady": steady[2] / steady[1] if steady[1] else math.nan,
            "hit_rate_run": (win[2] + steady[2]) / (win[1] + steady[1])
            if win[1] + steady[1] else math.nan,
            "hit_rate_run_without_faults": base_all,
            "requests_fault_window": win[0], "requests_steady": steady[0],
        }

    def placements_lost(self, dead: set[str]) -> int:
        """Blocks live engines hold that the registry does not index (waits up to 10 s for the
        index to settle); -1 when it could not be measured."""
        target = self.fleet.registry_target
        deadline = time.monotonic() + 10.0
        lost = -1
        while time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(target) as ch:
                    nodes = registry_pb2_grpc.RegistryStub(ch).ListNodes(
                        registry_pb2.ListNodesRequest(), timeout=5).nodes
                indexed = {n.node_id: n.blocks_indexed for n in nodes}
                lost = 0
                for e in self.fleet.engines:
                    if e.node_id in dead:
                        continue
                    held = _engine_cached_blocks(e.ready["metrics_port"])
                    lost += max(0, held - indexed.get(e.node_id, 0))
            except (grpc.RpcError, OSError, ValueError):
                lost = -1
            if lost == 0:
                return 0
            time.sleep(0.5)
        return lost


def _engine_cached_blocks(metrics_port: int) -> int:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("kvroute_engine_sim_cached_blocks"):
                return int(float(line.rsplit(" ", 1)[1]))
    raise ValueError(f"{url}: kvroute_engine_sim_cached_blocks not exported")


def format_summary(policy: str, s: dict[str, Any]) -> str:
    """One line per run for the console."""
    def pct(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{100 * v:.1f}%"
    return (f"  {policy:<14} failed {s['failed']}, naming a dead node "
            f"{s['decisions_naming_dead_node']}, blind {s['blind_decisions']} "
            f"({pct(s['blind_fraction'])}), placements lost {s['placements_lost']}; token hit "
            f"rate in the fault window {pct(s['hit_rate_fault_window'])} (same requests "
            f"without faults {pct(s['hit_rate_fault_window_without_faults'])}), outside it "
            f"{pct(s['hit_rate_steady'])}, whole run {pct(s['hit_rate_run'])} (without faults "
            f"{pct(s['hit_rate_run_without_faults'])}); {s['requests_fault_window']} / "
            f"{s['requests_steady']} requests in / outside the window")
