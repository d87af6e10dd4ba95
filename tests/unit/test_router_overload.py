"""Router overload and shutdown over a real in-process gRPC server: a concurrency limit refuses
fast with RESOURCE_EXHAUSTED, a caller that gave up does not keep its decision counted, the
request's deadline_s ends its in-flight entry, and a draining router finishes running calls
while refusing new ones with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from kvroute.v1 import router_pb2, router_pb2_grpc
from router_service.core import RouterCore
from router_service.load import LoadTracker
from router_service.placement import Placement
from router_service.policies.factory import PolicySet
from router_service.proto_adapter import to_route_request
from router_service.servicer import RouterServicer
from router_service.settings import RouterSettings
from router_service.tokenizer import load_tokenizer
from tests.unit.test_router_servicer import MemorySource

PROMPT = list(range(100, 164))


class SlowSource(MemorySource):
    """Lookups that wait (``pause_s``, without blocking the loop) or block the loop
    (``block_s``, like a CPU-starved router)."""

    local = False

    def __init__(self) -> None:
        super().__init__()
        self.pause_s = 0.0
        self.block_s = 0.0
        self.lookups = 0
        """Lookups begun (a Route call is being decided)."""

    async def lookup(self, block_hashes: Sequence[int], model: str) -> Placement:
        self.lookups += 1
        if self.pause_s:
            await asyncio.sleep(self.pause_s)
        if self.block_s:
            time.sleep(self.block_s)  # noqa: ASYNC251  (on purpose: a starved loop)
        return self.lookup_local(block_hashes, model)


Router = tuple[router_pb2_grpc.RouterStub, SlowSource, RouterServicer, LoadTracker]


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    src = SlowSource()
    src.add("a")
    src.add("b")
    clock = {"t": 0.0}
    tracker = LoadTracker(lambda: clock["t"])
    core = RouterCore(RouterSettings(registry="127.0.0.1:1"), PolicySet(), src, tracker,
                      load_tokenizer("simple"))
    servicer = RouterServicer(core)
    server = grpc.aio.server(maximum_concurrent_rpcs=3)
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield router_pb2_grpc.RouterStub(channel), src, servicer, tracker
    finally:
        await channel.close(None)
        await server.stop(None)


def req(rid: str, **kw: object) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(request_id=rid, token_ids=PROMPT, **kw)  # type: ignore[arg-type]


async def _code(aw: object) -> str:
    try:
        await aw  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def _timed(aw: object) -> tuple[str, float]:
    t0 = time.monotonic()
    code = await _code(aw)
    return code, time.monotonic() - t0


async def test_overload_is_refused_fast_with_resource_exhausted(router: Router) -> None:
    stub, src, _, _ = router
    src.pause_s = 1.0
    out = await asyncio.gather(*[_timed(stub.Route(req(f"r{i}"), timeout=5)) for i in range(8)])
    refused = [t for code, t in out if code == "RESOURCE_EXHAUSTED"]
    assert len(refused) == 5 and max(refused) < 0.5, out
    assert [code for code, _ in out].count("OK") == 3


async def test_a_caller_that_gave_up_does_not_stay_counted(router: Router) -> None:
    stub, src, servicer, tracker = router
    src.block_s = 0.3  # the decision is made after the caller's deadline passed
    assert await _code(stub.Route(req("late"), timeout=0.1)) == "DEADLINE_EXCEEDED"
    src.block_s = 0.0
    for _ in range(500):
        if tracker.total_inflight == 0:
            break
        await asyncio.sleep(0.02)
    assert tracker.total_inflight == 0 and servicer.abandoned == 1


async def test_deadline_s_ends_the_inflight_entry(router: Router) -> None:
    stub, _, _, tracker = router
    await stub.Route(req("d1", deadline_s=2.0))
    await stub.Route(req("d2"))
    assert tracker.total_inflight == 2
    tracker._clock = lambda: 2.5  # type: ignore[method-assign]
    assert tracker.inflight_by_node() and tracker.total_inflight == 1
    assert tracker.expired_total == 1
    assert await _code(stub.Route(req("bad", deadline_s=-1.0))) == "INVALID_ARGUMENT"
    assert to_route_request(req("x", deadline_s=30.0)).deadline_s == 30.0
    assert to_route_request(req("x")).deadline_s is None


async def test_drain_finishes_running_calls_and_refuses_new_ones(router: Router) -> None:
    stub, src, servicer, _ = router
    src.pause_s = 2.0
    running = asyncio.create_task(_code(stub.Route(req("run"), timeout=10)))
    for _ in range(500):  # the call is being decided (a fixed 0.1 s could come before it)
        if src.lookups:
            break
        await asyncio.sleep(0.01)
    assert src.lookups == 1 and not running.done()
    drained = asyncio.create_task(servicer.drain(5.0))
    await asyncio.sleep(0.05)
    try:
        await stub.Route(req("new"), timeout=5)
        raise AssertionError("a new Route during the drain was served")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in str(
            exc.details())
    assert (await stub.Complete(router_pb2.CompleteRequest(request_id="run"))) is not None
    assert await running == "OK"
    assert await drained is True
