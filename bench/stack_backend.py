"""The ``--mode stack`` :class:`bench.backend.Backend`: replays through real processes.

One :class:`bench.stack_fleet.StackFleet` (etcd, registry, router, N engine_sim + node agents)
serves every policy of a run. Before each policy the engines' prefix caches are emptied
(``/reset_prefix_cache`` → ``AllBlocksCleared`` events → the agents send ``cleared`` → the
registry drops the blocks), and the replay waits until the registry shows every node empty.
Emptied is not new: the agents keep the prefill rate they measured for each engine (issue 19's
calibration) and the registry keeps it for every router, so on a reused fleet only the first
replay starts uncalibrated; processes, etcd and the registry's node state are warm. Measured in
s26: on one reused fleet, whichever replay came second gained about 0.006 hit rate.
``fresh_fleet=True`` (``kvroute bench --mode stack``'s default) therefore stops every process
after a replay and starts a new fleet for the next, so every replay starts from the same state;
``kvroute demo`` reuses its fleets. Only the router's own policies can run here; the bench-only
re-implementations of peers are compared in ``--mode sim`` (and the real peers with
``--peers``).

Two fronts: ``kv_aware`` replays through the Router API (Route, engine, Complete) and
``gateway:kv_aware`` through the OpenAI gateway (one HTTP hop that decides in-process, as the
peers' HTTP routers do). ``front="gateway"`` sends plain names through the gateway too (the
demo). The fleet starts a gateway when ``spec.gateway`` is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench.prompts import Prompt, prepare
from bench.replica_view import burst_spacing, histogram_summary, spacing_note
from bench.results import PolicyRun
from bench.stack_fleet import FleetSpec, StackFleet
from bench.stack_replay import ReplayHook, replay_stack, reset_caches
from bench.workloads.base import Workload
from kvroute.v1 import registry_pb2, registry_pb2_grpc

STACK_POLICIES = ("kv_aware", "session", "round_robin", "least_loaded", "random")
"""Policies the router serves (and so can be replayed through the stack)."""

GATEWAY_PREFIX = "gateway:"
"""``gateway:<policy>`` = the policy, with requests sent through the OpenAI gateway."""


def split_front(name: str) -> tuple[bool, str]:
    """``gateway:kv_aware`` -> (True, "kv_aware"); ``kv_aware`` -> (False, "kv_aware");
    a replica suffix stays (``kv_aware@4``; :func:`split_replicas`)."""
    if name.startswith(GATEWAY_PREFIX):
        return True, name.removeprefix(GATEWAY_PREFIX)
    return False, name


def split_copy(policy: str) -> tuple[str, str]:
    """``kv_aware#2`` -> ("kv_aware", "2"): another replay of the same policy under its own
    label (an A/A check: does a later replay on the same run differ?); ``kv_aware`` ->
    ("kv_aware", "")."""
    base, _, copy = policy.partition("#")
    return base, copy


def split_replicas(policy: str) -> tuple[str, int]:
    """``kv_aware@4`` -> ("kv_aware", 4): the policy replayed over 4 router (or gateway)
    replicas behind a Service; ``kv_aware`` -> ("kv_aware", 1)."""
    base, sep, n = policy.partition("@")
    if not sep:
        return policy, 1
    if not n.isdigit() or int(n) < 1:
        raise KeyError(f"policy {policy!r}: the replica count after '@' must be a number >= 1")
    return base, int(n)


class StackBackend:
    """Replays on a real fleet; use as a context manager so every process is stopped."""

    mode = "stack"

    def __init__(self, workdir: Path, spec: FleetSpec,
                 progress: Callable[[int], None] | None = None, front: str = "route",
                 spread: str = "random", seed: int = 0, fresh_fleet: bool = False) -> None:
        if front not in ("route", "gateway"):
            raise ValueError(f"front must be route or gateway, got {front!r}")
        if front == "gateway" and not spec.gateway:
            spec = dataclasses.replace(spec, gateway=True)
        self.fleet = StackFleet(workdir, spec)
        self.workdir = workdir
        self.spec = spec
        self.fresh_fleet = fresh_fleet
        """Start a new fleet (every process) before each replay but the first (module
        docstring); False: every replay on the same processes, caches emptied."""
        self.fleets_started = 0
        """Fleets this backend started (1 + one per replay after the first when
        ``fresh_fleet``)."""
        self._replayed = 0
        self.progress = progress
        self.front = front
        self.spread = spread
        """How a ``POLICY@N`` replay spreads requests over replicas (random / round_robin)."""
        self.seed = seed
        self.hook: ReplayHook | None = None
        """Runs next to every replay (``--fault``: :class:`bench.faults.FaultInjector`)."""
        self._prompts: tuple[Workload, list[Prompt]] | None = None
        """The last workload's prepared prompts (reused by every policy)."""

    def __enter__(self) -> StackBackend:
        self.fleets_started += 1
        self.fleet.start()
        try:
            asyncio.run(self._wait_registry(lambda nodes: len(nodes) == self.spec.nodes,
                                            "every engine registered"))
        except BaseException:
            self.fleet.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.fleet.close()

    def close(self) -> None:
        """Stop every process of the fleet."""
        self.fleet.close()

    def new_fleet(self) -> None:
        """Stop every process of the fleet and start a new one (in ``WORKDIR-K``): new etcd,
        registry, engines, agents and routers, so nothing a replay left (the agents' measured
        prefill rates, the registry's node state, warm processes) reaches the next."""
        if self.hook is not None:
            raise RuntimeError("a fault hook holds the fleet it injects into: no new fleet")
        self.fleet.close()
        workdir = self.workdir.with_name(f"{self.workdir.name}-{self.fleets_started + 1}")
        self.fleet = StackFleet(workdir, self.spec, self.fleet.startup_timeout_s)
        self.__enter__()

    async def _wait_registry(self, ok: Callable[[list[registry_pb2.NodeInfo]], bool],
                             what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        ch = grpc.aio.insecure_channel(self.fleet.registry_target)
        stub = registry_pb2_grpc.RegistryStub(ch)
        try:
            while True:
                try:
                    resp = await stub.ListNodes(registry_pb2.ListNodesRequest(), timeout=5)
                    if ok(list(resp.nodes)):
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stack fleet: {what} not reached in {timeout_s:.0f} s\n"
                                       f"{self.fleet.log_tail()}")
                await asyncio.sleep(0.1)
        finally:
            await ch.close(None)

    def replay(self, workload: Workload, policy_name: str) -> PolicyRun:
        """Replay ``workload`` under ``policy_name`` on emptied caches."""
        via_gateway, policy = split_front(policy_name)
        policy, replicas = split_replicas(policy)
        policy = split_copy(policy)[0]
        if policy not in STACK_POLICIES:
            raise KeyError(f"policy {policy_name!r} is not served by the router; stack mode "
                           f"runs {', '.join(STACK_POLICIES)} (optionally as gateway:POLICY)")
        if via_gateway and not self.spec.gateway:
            raise KeyError(f"{policy_name}: this stack runs no gateway (FleetSpec.gateway)")
        gateway = via_gateway or self.front == "gateway"
        have = self.spec.gateways if gateway else self.spec.routers
        if replicas > have:
            raise KeyError(f"{policy_name}: this stack runs {have} "
                           f"{'gateway' if gateway else 'router'} replicas")
        if self.fresh_fleet and self._replayed:
            self.new_fleet()
        self._replayed += 1
        fronts = (self.fleet.gateway_urls if gateway else self.fleet.router_targets)[:replicas]
        for _ in range(self.hook.replays - 1 if self.hook is not None else 0):
            # e.g. the fault-free baseline
            asyncio.run(self._replay(workload, policy, policy_name, fronts, gateway))
        return asyncio.run(self._replay(workload, policy, policy_name, fronts, gateway))

    async def reset_fleet(self) -> dict[str, str]:
        """Empty every live engine's cache and wait until the registry saw it; id -> URL."""
        dead = self.hook.dead_nodes if self.hook is not None else set()
        urls = {e.node_id: e.url for e in self.fleet.engines if e.node_id not in dead}
        await reset_caches(urls)
        await self._wait_registry(
            lambda nodes: {n.node_id for n in nodes} == set(urls)
            and all(n.blocks_indexed == 0 and n.healthy for n in nodes),
            "every node's index emptied after the cache reset")
        return urls

    async def _share_note(self, via_gateway: bool, n: int,
                          ) -> tuple[str, list[dict[str, Any]]]:
        """What each replica's metrics say about the shared view after a replay (cumulative
        since the replica started): deltas applied, connected, burst decisions, staggered
        decisions; and per replica its view's staleness
        (:func:`bench.replica_view.histogram_summary`)."""
        ready = (self.fleet.gateways_ready if via_gateway else self.fleet.routers_ready)[:n]
        parts = []
        staleness: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http:
            for k, r in enumerate(ready):
                try:
                    async with http.get(f"http://127.0.0.1:{r['metrics_port']}/metrics") as resp:
                        text = await resp.text()
                except aiohttp.ClientError as exc:
                    parts.append(f"#{k}: metrics unreadable ({exc!r})")
                    staleness.append({})
                    continue
                staleness.append(histogram_summary(text))
                m = _metric_values(text)
                parts.append(
                    f"#{k}: connected {m.get('kvroute_router_shared_view_connected', 0):g}, "
                    f"deltas applied "
                    f"{m.get('kvroute_router_shared_view_staleness_seconds_count', 0):g}, "
                    f"deltas published "
                    f"{m.get('kvroute_router_shared_view_deltas_published_total', 0):g}, "
                    f"burst decisions "
                    f"{m.get('kvroute_router_replica_burst_decisions_total', 0):g}, "
                    f"staggered decisions "
                    f"{m.get('kvroute_router_replica_staggered_decisions_total', 0):g}")
        return "shared view per replica (since start): " + "; ".join(parts), staleness

    async def _replay(self, workload: Workload, policy: str, label: str, fronts: list[str],
                      via_gateway: bool) -> PolicyRun:
        if self.spec.routers > 1 or (self.spec.gateway and self.spec.gateways > 1):
            # POLICY and POLICY@N compare replicas: each starts on fresh routing state (a
            # replay would otherwise inherit the previous one's recent routes of the very same
            # prompts)
            await asyncio.to_thread(self.fleet.restart_fronts)
            fronts = (self.fleet.gateway_urls if via_gateway
                      else self.fleet.router_targets)[:len(fronts)]
        urls = await self.reset_fleet()
        if self._prompts is None or self._prompts[0] is not workload:
            self._prompts = (workload, prepare(workload))
        targets = self.fleet.router_targets[:1] if via_gateway else fronts
        run = await replay_stack(workload, policy, targets, urls,
                                 self.spec.model, self.spec.time_scale,
                                 self.spec.prefill_tokens_per_s, self.progress,
                                 prompts=self._prompts[1], hook=self.hook,
                                 gateway_url=fronts if via_gateway else None,
                                 spread=self.spread, seed=self.seed)
        run.policy = label
        n = len(fronts)
        if n > 1:
            note, staleness = await self._share_note(via_gateway, n)
            run.notes.append(note)
            if run.route_front:  # Router API: the client saw each decision's time
                run.replica_view = burst_spacing(
                    run.arrival_s, run.route_front, run.route_sent_wall_s,
                    run.route_answered_wall_s, n, self._burst_window_ms(), staleness)
                run.notes.append(spacing_note(run.replica_view))
            else:
                run.replica_view = {"per_replica": [{"replica": k, "staleness_ms": st}
                                                    for k, st in enumerate(staleness)]}
        replicas = (f", {n} replicas ({self.spread} spread, routes "
                    f"{'shared' if '--share-routes' in self.spec.router_args else 'NOT shared'})"
                    if n > 1 else "")
        run.notes.append(f"stack: {self.spec.nodes} engine_sim processes, time_scale "
                         f"{self.spec.time_scale}, block_size {self.spec.block_size}, front "
                         f"{'OpenAI gateway' if via_gateway else 'Router API (Route/Complete)'}"
                         f"{replicas}")
        return run


    def _burst_window_ms(self) -> float:
        """The routers' ``--share-burst-window-s`` (wall) in ms; the router's default when the
        bench passed none."""
        value = last_flag_value(self.spec.router_args, "--share-burst-window-s")
        if value is not None:
            return float(value) * 1000
        from router_service.settings import RouterSettings

        return RouterSettings().share_burst_window_s * 1000


def last_flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value ``flag`` has in ``args`` as argparse reads it: the last occurrence wins,
    ``--flag value`` or ``--flag=value``; None when absent."""
    for pos in range(len(args) - 1, -1, -1):
        if args[pos].startswith(flag + "="):
            return args[pos][len(flag) + 1:]
        if args[pos] == flag and pos + 1 < len(args):
            return args[pos + 1]
    return None


def _metric_values(text: str) -> dict[str, float]:
    """Unlabelled sample values of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out
