"""Router replicas sharing their view through the registry's RouteShare.Exchange (issue 19):
real registry server (memory store) and real routing runtimes on loopback gRPC."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from kvroute.blocks import HASH_SCHEME
from kvroute.procs import free_port
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from kvroute.v1 import route_share_pb2 as rs
from kvroute.v1 import route_share_pb2_grpc as rs_grpc
from registry_service.server import serve
from registry_service.settings import RegistrySettings
from router_service.domain import RouteRequest
from router_service.runtime import RoutingRuntime
from router_service.settings import RouterSettings
from tests.harness import until


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[str, asyncio.Event]]:
    ready = tmp_path / "ready.json"
    # nodes registered once, never heartbeating: an hour's lease (the default 10 s made them
    # late 6.7 s after registering)
    settings = RegistrySettings(store="memory", listen=f"127.0.0.1:{free_port()}",
                                ready_file=str(ready), metrics_listen="127.0.0.1:0",
                                status_write_interval_s=0, lease_ttl_s=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    await until(ready.exists)
    yield f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}", stop
    stop.set()
    assert await task == 0


async def _register(target: str, node: str, rate: float) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.RegistryStub(ch)
        r = await stub.RegisterNode(pb.RegisterNodeRequest(
            node_id=node, address=f"{node}:8000", model="m", block_size=16,
            capacity_blocks=1000, hash_scheme=HASH_SCHEME))
        await stub.Heartbeat(pb.HeartbeatRequest(node_id=node, epoch=r.epoch,
                                                 write_token=r.write_token,
                                                 prefill_tokens_per_s=rate))


def _runtime(target: str, rid: str) -> RoutingRuntime:
    return RoutingRuntime(RouterSettings(registry=target, share_routes=True,
                                         router_replica_id=rid, share_timeout_s=3.0),
                          None, CollectorRegistry())


async def test_replicas_share_inflight_completions_and_calibrated_rates(
        registry: tuple[str, asyncio.Event]) -> None:
    target, _ = registry
    await _register(target, "n1", 4000.0)
    await _register(target, "n2", 0.0)
    a, b = _runtime(target, "ra"), _runtime(target, "rb")
    await a.start()
    await b.start()
    try:
        for rt in (a, b):
            core = rt.core
            await until(lambda c=core: c.source.connected and c.share is not None  # type: ignore[misc]
                        and c.share.live())
        d = await a.core.decide(RouteRequest("q1", token_ids=list(range(64))))
        assert b.core.share is not None and a.core.share is not None
        await until(lambda: b.core.share is not None and b.core.share.remote.total == 1)
        assert b.core.share.remote.inflight(d.node_id) == 1
        assert b.core.share.max_staleness_s < 3.0
        # the Complete reaches replica b (a Service spread it): a releases its own count
        assert b.core.complete("q1")
        await until(lambda: a.core.tracker.inflight(d.node_id) == 0)
        # engine-measured prefill rate -> heartbeat -> registry -> router's tracker
        await b.core.decide(RouteRequest("q2", token_ids=list(range(100, 164))))
        assert b.core.tracker.rate("n1") == 4000.0
        assert b.core.tracker.rate("n2") == 16_000.0  # not measured: the flag's value
    finally:
        await a.stop()
        await b.stop()
    assert a.core.share is not None and not a.core.share.live()


async def test_a_replica_that_loses_the_hub_says_so(registry: tuple[str, asyncio.Event]) -> None:
    target, stop = registry
    await _register(target, "n1", 0.0)
    a = _runtime(target, "ra")
    await a.start()
    try:
        await until(lambda: a.core.share is not None and a.core.share.live())
        stop.set()  # the registry goes away
        await until(lambda: a.core.share is not None and not a.core.share.live())
        d = await a.core.decide(RouteRequest("q1", token_ids=list(range(64))))
        assert "OWN COUNTS ONLY (shared view lost" in d.reason
    finally:
        await a.stop()


async def test_hub_refuses_bad_input(registry: tuple[str, asyncio.Event]) -> None:
    target, _ = registry
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rs_grpc.RouteShareStub(ch)

        async def send(*msgs: rs.RouteShareMessage) -> grpc.StatusCode:
            call = stub.Exchange(iter(msgs))
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        assert await send(rs.RouteShareMessage()) == grpc.StatusCode.INVALID_ARGUMENT
        hello = rs.RouteShareMessage(hello=rs.RouteShareHello(replica_id="x"))
        bad = rs.RouteShareMessage(deltas=[rs.RouteDeltaMsg(request_id="", node_id="n")])
        assert await send(hello, bad) == grpc.StatusCode.INVALID_ARGUMENT
        no_node = rs.RouteShareMessage(deltas=[rs.RouteDeltaMsg(request_id="q")])
        assert await send(hello, no_node) == grpc.StatusCode.INVALID_ARGUMENT
        # relays between hubs: named, meant for this hub, and each delta names its origin
        unnamed = rs.RouteShareMessage(hello=rs.RouteShareHello(replica_id="h", relay=True))
        assert await send(unnamed) == grpc.StatusCode.INVALID_ARGUMENT
        elsewhere = rs.RouteShareMessage(hello=rs.RouteShareHello(
            replica_id="h", relay=True, hub_id="peer", to_hub_id="some-other-hub"))
        assert await send(elsewhere) == grpc.StatusCode.FAILED_PRECONDITION


async def test_hub_delivers_a_relay_to_its_replicas_and_forgets_a_silent_one(
        tmp_path: Path) -> None:
    """Issue 19, the hub's side of the relay between registries: a peer hub's deltas keep
    their origin replica, reach this hub's replicas (not the relay), and when the relay falls
    silent the hub drops it and tells its replicas to forget the origin's requests."""
    ready = tmp_path / "ready.json"
    stop = asyncio.Event()
    task = asyncio.create_task(serve(RegistrySettings(
        store="memory", listen=f"127.0.0.1:{free_port()}", ready_file=str(ready),
        metrics_listen="127.0.0.1:0", share_relay_timeout_s=0.5), stop))
    await until(ready.exists)
    target = f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}"
    try:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = rs_grpc.RouteShareStub(ch)
            replica_done = asyncio.Event()

            async def replica_out() -> AsyncIterator[rs.RouteShareMessage]:
                yield rs.RouteShareMessage(hello=rs.RouteShareHello(replica_id="r1"))
                await replica_done.wait()
            replica = stub.Exchange(replica_out())
            hub_id = (await replica.read()).hub_id
            assert hub_id

            async def relay_out() -> AsyncIterator[rs.RouteShareMessage]:
                yield rs.RouteShareMessage(hello=rs.RouteShareHello(
                    replica_id="reg-peer", relay=True, hub_id="peer-hub", to_hub_id=hub_id))
                yield rs.RouteShareMessage(deltas=[rs.RouteDeltaMsg(
                    replica_id="rx", request_id="q1", node_id="n1", origin_hub="peer-hub")])
                await asyncio.sleep(30)  # then silence: no keepalive
            relay = stub.Exchange(relay_out())
            first = await relay.read()
            assert first.hub_id == hub_id and not first.deltas
            got: list[rs.RouteShareMessage] = []
            while not any(m.forget_replicas for m in got):
                got.append(await asyncio.wait_for(replica.read(), 10))  # type: ignore[arg-type]
            deltas = [d for m in got for d in m.deltas]
            assert [(d.replica_id, d.request_id, d.origin_hub) for d in deltas] == [
                ("rx", "q1", "peer-hub")]
            assert [list(m.forget_replicas) for m in got if m.forget_replicas] == [["rx"]]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                for _ in range(100):  # keepalives until the hub drops the silent relay
                    msg = await asyncio.wait_for(relay.read(), 10)
                    assert isinstance(msg, rs.RouteShareMessage) and not msg.deltas
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            replica_done.set()
            replica.cancel()
    finally:
        stop.set()
        assert await task == 0


async def test_a_relay_link_stop_does_not_swallow_its_callers_cancellation() -> None:
    """The relay's directory follower stops links as hubs leave; cancelled meanwhile (the
    registry shutting down) it must end, not swallow the cancel and keep following."""
    from kvroute.settings import TLSSettings
    from registry_service.share_relay_link import RelayLink, RelayMetrics
    from registry_service.store.hubs import HubRecord

    link = RelayLink(HubRecord("me", "reg-a", "127.0.0.1:1"), HubRecord("p", "reg-b",
                     "127.0.0.1:2"), TLSSettings(), RelayMetrics(CollectorRegistry()),
                     timeout_s=1.0, retry_max_s=0.1, max_queued=10)

    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # e.g. closing its channel
            raise
    link._task = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    caller = asyncio.create_task(link.stop())
    await asyncio.sleep(0.05)
    caller.cancel()
    await asyncio.wait({caller}, timeout=5)
    assert caller.cancelled()
