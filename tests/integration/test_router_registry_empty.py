"""A registry that comes back knowing no node (it restarted after every lease expired; here a
memory-store registry restarted) while its agents re-register: the router keeps routing on its
previous mirror instead of failing requests until a node is listed again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from kvroute.procs import free_port
from kvroute.v1 import router_pb2, router_pb2_grpc
from tests.harness import start_server
from tests.integration.test_router_stack import HASHES, MODEL, PROMPT, Agents

pytestmark = pytest.mark.integration


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

            for _ in range(100):  # wait until routing works
                r = await stub.Route(router_pb2.RouteRequest(request_id="w", token_ids=PROMPT,
                                                             model=MODEL), timeout=3)
                await stub.Complete(router_pb2.CompleteRequest(request_id="w"))
                if r.node_id == "b" and r.matched_blocks == 7:
                    break
                await asyncio.sleep(0.1)
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
