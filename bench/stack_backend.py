"""The ``--mode stack`` :class:`bench.backend.Backend`: replays through real processes.

One :class:`bench.stack_fleet.StackFleet` (etcd, registry, router, N engine_sim + node agents)
serves every policy of a run. Before each policy the engines' prefix caches are emptied
(``/reset_prefix_cache`` → ``AllBlocksCleared`` events → the agents send ``cleared`` → the
registry drops the blocks), and the replay waits until the registry shows every node empty, so
each policy starts on a fresh fleet. Only the router's own policies can run here; the bench-only
re-implementations of peers are compared in ``--mode sim`` (and the real peers with ``--peers``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bench.prompts import Prompt, prepare
from bench.results import PolicyRun
from bench.stack_fleet import FleetSpec, StackFleet
from bench.stack_replay import ReplayHook, replay_stack, reset_caches
from bench.workloads.base import Workload
from kvroute.v1 import registry_pb2, registry_pb2_grpc

STACK_POLICIES = ("kv_aware", "session", "round_robin", "least_loaded", "random")
"""Policies the router serves (and so can be replayed through the stack)."""


class StackBackend:
    """Replays on a real fleet; use as a context manager so every process is stopped."""

    mode = "stack"

    def __init__(self, workdir: Path, spec: FleetSpec,
                 progress: Callable[[int], None] | None = None) -> None:
        self.fleet = StackFleet(workdir, spec)
        self.spec = spec
        self.progress = progress
        self.hook: ReplayHook | None = None
        """Runs next to every replay (``--fault``: :class:`bench.faults.FaultInjector`)."""
        self._prompts: tuple[Workload, list[Prompt]] | None = None
        """The last workload's prepared prompts (reused by every policy)."""

    def __enter__(self) -> StackBackend:
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
        if policy_name not in STACK_POLICIES:
            raise KeyError(f"policy {policy_name!r} is not served by the router; stack mode "
                           f"runs {', '.join(STACK_POLICIES)}")
        for _ in range(self.hook.replays - 1 if self.hook is not None else 0):
            asyncio.run(self._replay(workload, policy_name))  # e.g. the fault-free baseline
        return asyncio.run(self._replay(workload, policy_name))

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

    async def _replay(self, workload: Workload, policy_name: str) -> PolicyRun:
        urls = await self.reset_fleet()
        if self._prompts is None or self._prompts[0] is not workload:
            self._prompts = (workload, prepare(workload))
        run = await replay_stack(workload, policy_name, self.fleet.router_target, urls,
                                 self.spec.model, self.spec.time_scale,
                                 self.spec.prefill_tokens_per_s, self.progress,
                                 prompts=self._prompts[1], hook=self.hook)
        run.notes.append(f"stack: {self.spec.nodes} engine_sim processes, time_scale "
                         f"{self.spec.time_scale}, block_size {self.spec.block_size}")
        return run
