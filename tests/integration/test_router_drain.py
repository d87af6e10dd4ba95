"""Router SIGTERM with 40 callers running Route → Complete: calls in flight finish (and the
Completes of their decisions), Routes arriving after the signal are refused with UNAVAILABLE
(a caller then moves to another router), nothing is CANCELLED, and the process exits 0. A
registry process (memory store) and the router run as real processes."""

from __future__ import annotations

import asyncio
import collections
import signal
from pathlib import Path

import grpc
import pytest

from kvroute.v1 import registry_pb2 as rpb
from kvroute.v1 import registry_pb2_grpc as rgrpc
from kvroute.v1 import router_pb2, router_pb2_grpc
from tests.harness import start_server, until

pytestmark = pytest.mark.integration


async def test_router_sigterm_finishes_calls_in_flight(tmp_path: Path) -> None:
    # the nodes are registered once and never heartbeat: an hour's lease (60 s made them late,
    # unhealthy, after 42 s)
    reg = start_server("registry", ["--store", "memory", "--lease-ttl-s", "3600"], tmp_path,
                       name="reg")
    router = None
    try:
        async with grpc.aio.insecure_channel(reg.grpc_target) as ch:
            stub = rgrpc.RegistryStub(ch)
            for n in ("a", "b", "c"):
                await stub.RegisterNode(rpb.RegisterNodeRequest(
                    node_id=n, address=f"{n}:1", model="m", block_size=16, capacity_blocks=100))
        router = start_server("router", ["--registry", reg.grpc_target, "--drain-timeout-s",
                                         "5"], tmp_path)
        codes: collections.Counter[str] = collections.Counter()
        sigterm = asyncio.Event()

        async def caller(i: int) -> None:
            assert router is not None
            async with grpc.aio.insecure_channel(router.grpc_target) as ch:
                s = router_pb2_grpc.RouterStub(ch)
                n = 0
                while True:
                    n += 1
                    rid, what = f"{i}-{n}", "Route"
                    try:
                        await s.Route(router_pb2.RouteRequest(
                            request_id=rid, model="m", token_ids=list(range(64))), timeout=5)
                        await asyncio.sleep(0.01)
                        what = "Complete"
                        await s.Complete(router_pb2.CompleteRequest(request_id=rid), timeout=5)
                        codes[f"{what} OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        refused = "shutting down" in str(exc.details())
                        codes[f"{what} {exc.code().name}{' (refused)' * refused}"] += 1
                        if sigterm.is_set():
                            return  # a real caller moves to another router replica
                        await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(caller(i)) for i in range(40)]
        # every caller busy before the signal: wait for the calls to flow (a fixed 1.5 s was
        # too short on a loaded machine, where 40 channels and the router's sync take longer)
        await until(lambda: codes["Complete OK"] > 40, 30.0, "over 40 Route -> Complete done")
        codes.clear()  # (the first calls may find the router's replica not yet in sync)
        assert router.process.proc is not None
        router.process.proc.send_signal(signal.SIGTERM)
        sigterm.set()
        rc = await asyncio.to_thread(router.process.proc.wait, 20)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert rc == 0
        # a Route the router had started finished, and so did its Complete; Routes reaching it
        # after the signal were refused (UNAVAILABLE, "shutting down": no decision was made)
        bad = {k: v for k, v in codes.items()
               if not k.endswith(" OK") and k != "Route UNAVAILABLE (refused)"}
        assert not bad, f"calls failed other than new Routes refused after SIGTERM: {codes}"
        assert "drained in" in router.process.tail(5)
    finally:
        if router is not None:
            router.stop()
        reg.stop()
