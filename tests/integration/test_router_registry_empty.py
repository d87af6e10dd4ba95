"""A registry that comes back knowing no node (it restarted after every lease expired; here a
memory-store registry restarted) while its agents re-register: the router keeps routing on its
previous mirror instead of failing requests until a node is listed again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from kvroute.procs import free_port
from kvroute.v1 import registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc
from tests.harness import start_server
from tests.integration.test_router_stack import HASHES, MODEL, PROMPT, Agents

pytestmark = pytest.mark.integration


async def until_routed(stub: router_pb2_grpc.RouterStub, node: str, blocks: int,
                       within_s: float = 30.0) -> None:
    """Until the router routes PROMPT to ``node`` with ``blocks`` matched. Before its placement
    mirror holds a first snapshot the router answers UNAVAILABLE (on a loaded machine that can
    last a while after it reported ready): that is waited out, like a not-yet-placed node."""
    deadline = time.monotonic() + within_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = await stub.Route(router_pb2.RouteRequest(request_id="w", token_ids=PROMPT,
                                                         model=MODEL), timeout=3)
            await stub.Complete(router_pb2.CompleteRequest(request_id="w"))
            last = f"{r.node_id}:{r.matched_blocks}"
            if (r.node_id, r.matched_blocks) == (node, blocks):
                return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            last = f"{exc.code().name}: {exc.details()}"
        await asyncio.sleep(0.1)
    raise AssertionError(f"not routed to {node}:{blocks} within {within_s} s (last: {last})")


async def test_an_empty_registry_after_a_restart_does_not_fail_routes(tmp_path: Path) -> None:
    port = free_port()
    args = ["--store", "memory", "--block-size", "16", "--lease-ttl-s", "5",
            "--listen", f"127.0.0.1:{port}"]
    reg = start_server("registry", args, tmp_path, name="reg1")
    agents = Agents(reg.grpc_target, {"a": HASHES[:3], "b": HASHES[:7]})
    router = None
    procs = [reg]
    try:
        await agents.start()
        router = start_server("router", ["--registry", reg.grpc_target, "--block-size", "16",
                                         "--registry-retry-max-s", "0.2"], tmp_path)
        async with grpc.aio.insecure_channel(router.grpc_target) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            out: list[str] = []

            async def traffic() -> None:
                n = 0
                while True:
                    n += 1
                    try:
                        r = await stub.Route(router_pb2.RouteRequest(
                            request_id=f"r{n}", token_ids=PROMPT, model=MODEL), timeout=3)
                        out.append(r.node_id + " (degraded)" * r.degraded)
                        await stub.Complete(router_pb2.CompleteRequest(request_id=f"r{n}"))
                    except grpc.aio.AioRpcError as exc:
                        out.append(f"{exc.code().name}: {exc.details()}")
                    await asyncio.sleep(0.02)

            await until_routed(stub, "b", 7)
            task = asyncio.create_task(traffic())
            await asyncio.sleep(0.5)
            reg.process.kill()
            await asyncio.sleep(0.5)
            procs.append(start_server("registry", args, tmp_path, name="reg2"))  # empty
            await asyncio.sleep(4.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        failed = [o for o in out if o not in ("a", "b")]
        assert not failed, f"{len(failed)} of {len(out)} Routes failed or degraded: {failed[:3]}"
    finally:
        await agents.stop()
        if router is not None:
            router.stop()
        for p in procs:
            p.stop()


async def test_nodes_re_registering_one_by_one_do_not_move_their_prefixes(
        tmp_path: Path) -> None:
    """After an outage longer than the lease TTL the registry comes back empty and the agents
    re-register one at a time, each without blocks until its Resync: until every node of the
    previous mirror is listed with blocks again, the router keeps routing on that mirror (the
    prefix stays on the node holding it instead of moving to whichever node is listed first,
    where the router's recent-route belief would then keep it)."""
    port = free_port()
    args = ["--store", "memory", "--block-size", "16", "--lease-ttl-s", "5",
            "--listen", f"127.0.0.1:{port}"]
    procs = [start_server("registry", args, tmp_path, name="reg1")]
    agents = Agents(procs[0].grpc_target, {"a": HASHES[:3], "b": HASHES[:7]})
    back: list[Agents] = []
    router = None
    try:
        await agents.start()
        router = start_server("router", ["--registry", procs[0].grpc_target, "--block-size",
                                         "16", "--registry-retry-max-s", "0.2"], tmp_path)
        async with grpc.aio.insecure_channel(router.grpc_target) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            n = 0

            async def route() -> str:
                nonlocal n
                n += 1
                r = await stub.Route(router_pb2.RouteRequest(
                    request_id=f"r{n}", token_ids=PROMPT, model=MODEL), timeout=3)
                await stub.Complete(router_pb2.CompleteRequest(request_id=f"r{n}"))
                return f"{r.node_id}:{r.matched_blocks}" + " (degraded)" * r.degraded

            await until_routed(stub, "b", 7)
            await agents.stop()
            procs[0].process.kill()
            procs.append(start_server("registry", args, tmp_path, name="reg2"))  # empty
            out: list[str] = []

            async def routes(k: int) -> None:
                for _ in range(k):
                    out.append(await route())
                    await asyncio.sleep(0.05)

            back.append(Agents(procs[1].grpc_target, {"a": HASHES[:3]}))
            await back[0].start()  # a is back (with its blocks), b not yet
            await routes(10)
            async with grpc.aio.insecure_channel(procs[1].grpc_target) as reg:
                await registry_pb2_grpc.RegistryStub(reg).RegisterNode(
                    registry_pb2.RegisterNodeRequest(
                        node_id="b", address="b.local:8000", model=MODEL, block_size=16,
                        capacity_blocks=1000), timeout=3)  # b is back, its Resync not yet
            await routes(10)
            back.append(Agents(procs[1].grpc_target, {"b": HASHES[:7]}))
            await back[1].start()  # b is back with its blocks
            await routes(10)
        assert out == ["b:7"] * 30, out
    finally:
        for a in (agents, *back):
            await a.stop()
        if router is not None:
            router.stop()
        for p in procs:
            p.stop()
