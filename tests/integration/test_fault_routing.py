"""Routing through control-plane faults (issue 15), with real etcd, registries, engine_sim +
node agents and a router, traffic running the whole time: 0 failed Routes; once the registry
serves again, decisions are cache-aware within 1 s; no placement is lost (every node's index
equals its engine's cache); a killed engine leaves routing within one heartbeat interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from tests.harness import metric, scrape
from tests.integration.fault_stack import HB, TTL, FaultStack, Traffic, complete_on, prompt

pytestmark = pytest.mark.integration


def engine_cached_blocks(metrics_url: str) -> int:
    return int(metric(scrape(metrics_url), "kvroute_engine_sim_cached_blocks"))


def indexed(target: str) -> dict[str, tuple[int, bool]]:
    with grpc.insecure_channel(target) as ch:
        resp = pb_grpc.RegistryStub(ch).ListNodes(pb.ListNodesRequest(), timeout=5)
    return {n.node_id: (n.blocks_indexed, n.healthy) for n in resp.nodes}


async def no_placement_lost(stack: FaultStack, within_s: float = 15.0) -> None:
    """Every registry's index equals every engine's own cache, all nodes healthy."""
    deadline = time.monotonic() + within_s
    while True:
        want = {n.node_id: (engine_cached_blocks(n.engine.metrics_url), True)
                for n in stack.fleet if n.engine is not None}
        got = [await asyncio.to_thread(indexed, f"127.0.0.1:{p}") for p in stack.reg_ports]
        if all(g == want for g in got):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"index {got} != engines {want}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _running(tmp: Path, registries: int) -> AsyncIterator[tuple[FaultStack, Traffic]]:
    """The stack with ``registries`` registries, traffic running and routing cache-aware; on
    exit (or a failed start) the traffic stops (whatever it raises), then every process."""
    stack = await asyncio.to_thread(FaultStack(tmp, registries=registries).start)
    traffic = Traffic(stack.router_target, {i: n.node_id for i, n in enumerate(stack.fleet)})
    try:
        for i, node in enumerate(stack.fleet):
            await asyncio.to_thread(complete_on, node.ports["http"], prompt(i))
        traffic.start()
        await traffic.wait_cache_aware(15)
        yield stack, traffic
    finally:
        try:
            await traffic.stop()
        finally:
            await asyncio.to_thread(stack.close)


@pytest.fixture
async def one_registry(tmp_path: Path) -> AsyncIterator[tuple[FaultStack, Traffic]]:
    async with _running(tmp_path, 1) as running:
        yield running


@pytest.fixture
async def two_registries(tmp_path: Path) -> AsyncIterator[tuple[FaultStack, Traffic]]:
    async with _running(tmp_path, 2) as running:
        yield running


async def _recovers(stack: FaultStack, traffic: Traffic, serving_at: float) -> None:
    """Cache-aware within 1 s of the registry serving, nothing failed, nothing lost."""
    await asyncio.sleep(2.0)
    since = traffic.cache_aware_since(serving_at)
    assert since is not None and since - serving_at <= 1.0, (
        f"cache-aware {None if since is None else round(since - serving_at, 2)} s after the "
        f"registry served; {traffic.summary()}; after: "
        f"{[o for o in traffic.out if o.t >= serving_at][-4:]}")
    await no_placement_lost(stack)
    assert not traffic.failures(), traffic.summary()


async def test_registry_sigkill_and_restart(one_registry: tuple[FaultStack, Traffic]) -> None:
    stack, traffic = one_registry
    reg = stack.regs[0]
    assert reg is not None
    reg.process.kill()
    await asyncio.sleep(2.5)
    await asyncio.to_thread(stack.start_registry, 0)
    await _recovers(stack, traffic, time.monotonic())


async def test_registry_sigterm_and_restart(one_registry: tuple[FaultStack, Traffic]) -> None:
    stack, traffic = one_registry
    reg = stack.regs[0]
    assert reg is not None
    assert await asyncio.to_thread(reg.stop) == 0
    await asyncio.sleep(1.0)
    await asyncio.to_thread(stack.start_registry, 0)
    await _recovers(stack, traffic, time.monotonic())


async def test_rolling_restart_of_two_registries(
        two_registries: tuple[FaultStack, Traffic]) -> None:
    stack, traffic = two_registries
    for i in (0, 1):
        reg = stack.regs[i]
        assert reg is not None
        assert await asyncio.to_thread(reg.stop) == 0
        await asyncio.to_thread(stack.start_registry, i)
        await asyncio.sleep(1.5)
    degraded = [o for o in traffic.out if o.degraded]
    assert not degraded, f"{len(degraded)} degraded decisions: {traffic.summary()}"
    await _recovers(stack, traffic, time.monotonic() - 1.5)


async def test_etcd_paused_for_less_than_the_lease_ttl(
        one_registry: tuple[FaultStack, Traffic]) -> None:
    stack, traffic = one_registry
    assert stack.etcd is not None and stack.etcd.process is not None
    stack.etcd.process.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(TTL - 1.5)
    finally:
        stack.etcd.process.signal(signal.SIGCONT)
    t = time.monotonic()
    degraded = [o for o in traffic.out if o.degraded]
    assert not degraded, traffic.summary()
    await _recovers(stack, traffic, t)


async def test_etcd_sigkill_and_restart(one_registry: tuple[FaultStack, Traffic]) -> None:
    stack, traffic = one_registry
    assert stack.etcd is not None
    stack.etcd.kill()
    await asyncio.sleep(2.0)
    await asyncio.to_thread(stack.etcd.start)
    await _recovers(stack, traffic, time.monotonic())


async def test_engine_sigkill_leaves_routing_within_a_heartbeat(
        one_registry: tuple[FaultStack, Traffic]) -> None:
    stack, traffic = one_registry
    node = stack.fleet[0]
    assert node.engine is not None
    node.engine.process.kill()
    killed = time.monotonic()
    await asyncio.sleep(3.0)
    late = [o for o in traffic.out if o.t > killed + HB + 0.5 and o.node == node.node_id]
    assert not late, f"{len(late)} decisions named the dead node after one heartbeat interval"
    assert not traffic.failures(), traffic.summary()
    # the engine comes back empty: the node returns without its old (stale) blocks
    await asyncio.to_thread(stack.start_engine, node)
    reg = f"127.0.0.1:{stack.reg_ports[0]}"
    t0 = time.monotonic()
    while node.node_id not in await asyncio.to_thread(indexed, reg):
        assert time.monotonic() - t0 < 10, "node did not return with its engine"
        await asyncio.sleep(0.1)
    assert (await asyncio.to_thread(indexed, reg))[node.node_id][0] == 0, "stale blocks back"
    # requests for prompt 0 went to node-1 meanwhile (the router expects them cached there):
    # check cache-awareness with a prompt the new engine serves first
    await asyncio.to_thread(complete_on, node.ports["http"], prompt(7))
    traffic.prompts = {7: node.node_id, 1: stack.fleet[1].node_id}
    await traffic.wait_cache_aware(10)
    await no_placement_lost(stack)


async def test_two_registries_sigkill_the_one_in_use(
        two_registries: tuple[FaultStack, Traffic]) -> None:
    """Router and agents list both replicas: killing the one they use moves them to the other
    within a second; the survivor keeps every node past the lease TTL."""
    stack, traffic = two_registries
    reg = stack.regs[0]
    assert reg is not None
    reg.process.kill()
    stack.regs[0] = None
    killed = time.monotonic()
    await asyncio.sleep(TTL + 1.0)
    survivor = f"127.0.0.1:{stack.reg_ports[1]}"
    nodes = await asyncio.to_thread(indexed, survivor)
    assert sorted(nodes) == ["node-0", "node-1"] and all(h for _, h in nodes.values()), nodes
    degraded = [o for o in traffic.out if o.degraded]
    assert not degraded and not traffic.failures(), traffic.summary()
    since = traffic.cache_aware_since(killed)
    assert since is not None and since - killed <= 1.0, traffic.summary()
    stack.reg_ports = stack.reg_ports[1:]
    stack.regs = stack.regs[1:]
    await no_placement_lost(stack)
