"""A router's requests in flight survive a forget (issue 19): on every (re)connect, and when its
hub asks, a router re-announces them as a snapshot that the others put in place of what they
hold for it. Real registry servers (memory store) and real routing runtimes on loopback gRPC;
the epoch rules on a real SharedView."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from kvroute.blocks import HASH_SCHEME
from kvroute.procs import free_port
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from registry_service.server import serve
from registry_service.settings import RegistrySettings
from router_service.domain import RouteRequest
from router_service.load import LoadTracker
from router_service.policies.factory import PolicySet
from router_service.route_share import RouteDelta, SharedView
from router_service.runtime import RoutingRuntime
from router_service.settings import RouterSettings
from tests.harness import until


@contextlib.asynccontextmanager
async def _registry(tmp_path: Path, port: int) -> AsyncIterator[str]:
    """A real registry server (memory store) on ``port``, stopped on exit."""
    ready = tmp_path / f"ready-{port}-{free_port()}.json"
    # the nodes are registered once and never heartbeat: an hour's lease (the default 10 s
    # made them late, unhealthy, 6.7 s after registering, which a loaded machine's reconnects
    # and share links could outlast: no healthy node to count or route to)
    settings = RegistrySettings(store="memory", listen=f"127.0.0.1:{port}",
                                ready_file=str(ready), metrics_listen="127.0.0.1:0",
                                status_write_interval_s=0, lease_ttl_s=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        await until(ready.exists, what="registry ready")
        target = f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}"
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.RegistryStub(ch)
            for node in ("n1", "n2"):
                await stub.RegisterNode(pb.RegisterNodeRequest(
                    node_id=node, address=f"{node}:8000", model="m", block_size=16,
                    capacity_blocks=1000, hash_scheme=HASH_SCHEME))
        yield target
    finally:
        stop.set()
        assert await task == 0


def _runtime(target: str, rid: str) -> RoutingRuntime:
    return RoutingRuntime(RouterSettings(registry=target, share_routes=True,
                                         router_replica_id=rid, share_timeout_s=3.0,
                                         registry_retry_max_s=0.3),
                          None, CollectorRegistry())


def _view(rt: RoutingRuntime) -> SharedView:
    assert rt.core.share is not None
    return rt.core.share


async def _live(*rts: RoutingRuntime) -> None:
    for rt in rts:
        await until(lambda r=rt: r.core.source.connected and _view(r).live()  # type: ignore[misc]
                     and r.core.healthy_node_count() == 2, what=f"{_view(rt).replica_id} live")


def _same_as_own(b: SharedView, a: RoutingRuntime) -> bool:
    """b counts exactly a's requests in flight, node by node."""
    own, rid = a.core.tracker.inflight_by_node(), _view(a).replica_id
    return (b.remote.of(rid) == sum(own.values())
            and all(b.remote.of(rid, n) == k for n, k in own.items()))


async def _route(rt: RoutingRuntime, n: int, base: int) -> list[str]:
    ids = [f"{_view(rt).replica_id}-{base + i}" for i in range(n)]
    for i, rid in enumerate(ids):
        await rt.core.decide(RouteRequest(rid, token_ids=list(range((base + i) * 100,
                                                                     (base + i) * 100 + 64))))
    return ids


async def test_a_registry_restart_loses_no_request_in_flight(tmp_path: Path) -> None:
    port = free_port()
    first = contextlib.AsyncExitStack()
    target = await first.enter_async_context(_registry(tmp_path, port))
    a, b = _runtime(target, "ra"), _runtime(target, "rb")
    await a.start()
    await b.start()
    try:
        await _live(a, b)
        va, vb = _view(a), _view(b)
        ids = await _route(a, 3, 0)
        await until(lambda: vb.remote.total == 3, what="b counts a's 3 requests")
        await first.aclose()  # the registry is gone: the shared part of each view is dropped
        await until(lambda: not va.live() and not vb.live(), what="both lose the view")
        assert vb.remote.total == 0 and a.core.tracker.total_inflight == 3
        async with _registry(tmp_path, port):  # back on the same address
            await _live(a, b)
            # a re-announced its 3 requests: b counts them again, node by node, once
            await until(lambda: _same_as_own(vb, a) and vb.remote.total == 3,
                         what="b rebuilds a's contribution from a's snapshot")
            assert vb.snapshots_applied >= 1 and va.snapshots_sent >= 2
            assert a.core.complete(ids[0])
            await until(lambda: vb.remote.total == 2, what="a completion after it")
            for rid in ids[1:]:
                assert b.core.complete(rid)  # through the other replica (a Service)
            await until(lambda: vb.remote.total == 0 and a.core.tracker.total_inflight == 0,
                         what="all released")
            await asyncio.sleep(0.5)  # nothing late, nothing twice
            assert vb.remote.total == 0 and va.remote.total == 0
    finally:
        await a.stop()
        await b.stop()
        await first.aclose()


async def test_a_stream_blip_and_a_join_restore_and_never_double_count(tmp_path: Path) -> None:
    async with _registry(tmp_path, free_port()) as target:
        a, b, c = _runtime(target, "ra"), _runtime(target, "rb"), _runtime(target, "rc")
        await a.start()
        await b.start()
        try:
            await _live(a, b)
            va, vb = _view(a), _view(b)
            ids_a = await _route(a, 4, 0)
            ids_b = await _route(b, 2, 10)
            await until(lambda: vb.remote.total == 4 and va.remote.total == 2,
                         what="each counts the other's")
            # a's stream ends and a reconnects (a network blip): the hub has b forget a's
            # requests, then a's snapshot brings them back
            link = a.share_link
            assert link is not None
            await link.stop()
            await until(lambda: vb.forgotten_total == 4, what="b forgets a's requests")
            await link.start()
            await until(lambda: _same_as_own(vb, a) and vb.remote.total == 4,
                         what="b counts a's requests again")
            # a rejoined with an empty view of b: the hub asked b to re-announce
            await until(lambda: _same_as_own(va, b) and va.remote.total == 2,
                         what="a counts b's requests again")
            # a third router joins: everyone re-announces once more, nothing counted twice
            await c.start()
            await _live(c)
            vc = _view(c)
            await until(lambda: vc.remote.total == 6, what="c counts a's and b's")
            await asyncio.sleep(0.5)
            assert vb.remote.total == 4 and va.remote.total == 2
            assert _same_as_own(vb, a) and _same_as_own(vc, a) and _same_as_own(vc, b)
            for rid in ids_a:
                assert a.core.complete(rid)
            for rid in ids_b:
                assert c.core.complete(rid)  # another replica's request, completed at c
            await until(lambda: va.remote.total == vb.remote.total == vc.remote.total == 0,
                         what="every count back to 0")
            assert a.core.tracker.total_inflight == b.core.tracker.total_inflight == 0
            await asyncio.sleep(0.5)
            assert va.remote.total == vb.remote.total == vc.remote.total == 0
        finally:
            for rt in (a, b, c):
                await rt.stop()


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _live_view(clock: _Clock) -> tuple[SharedView, LoadTracker]:
    view = SharedView("me", lambda d: None, clock, timeout_s=5.0)
    view.set_connected(True)
    return view, LoadTracker(clock)


def _routed(rid: str, req: str, node: str, epoch: int, at: float) -> RouteDelta:
    return RouteDelta(rid, req, node, 100, 0, (), at, epoch=epoch)


def test_snapshots_replace_and_epochs_order_two_paths() -> None:
    clock = _Clock()
    view, _ = _live_view(clock)
    snap = [_routed("a", f"q{i}", "n1", 3, clock.t - 1) for i in range(3)]
    # two parts of one snapshot, then the same snapshot again: 3, never 6
    assert view.apply_snapshot("a", 3, True, snap[:2]) == 2
    assert view.apply_snapshot("a", 3, False, snap[2:]) == 1
    view.apply_snapshot("a", 3, True, snap)
    assert view.remote.of("a") == 3 and view.remote.inflight("n1") == 3
    # a forget from the path of an older epoch (a's old hub noticed late): ignored
    assert view.forget(["a"], [2]) == 0 and view.remote.of("a") == 3
    # a delta that came the long way round (epoch 2, an old hub's relay): ignored
    view.apply(_routed("a", "old", "n2", 2, clock.t), *_policy_free(clock))
    assert view.remote.of("a") == 3 and view.remote.stale_total == 2
    # a forget of the current epoch: dropped; what a sent on that path afterwards is stale,
    # its next snapshot (a newer epoch) counts
    assert view.forget(["a"], [3]) == 3
    view.apply(_routed("a", "late", "n2", 3, clock.t), *_policy_free(clock))
    assert view.remote.total == 0
    assert view.apply_snapshot("a", 4, True, [_routed("a", "q9", "n2", 4, clock.t)]) == 1
    assert view.remote.inflight("n2") == 1
    # an empty snapshot replaces too (a completed everything while it was away)
    view.apply_snapshot("a", 5, True, [])
    assert view.remote.total == 0
    # an old snapshot arriving after it: ignored; an unknown epoch (0) forget always applies
    assert view.apply_snapshot("a", 4, True, snap) == 0 and view.remote.total == 0
    view.apply_snapshot("b", 1, True, [_routed("b", "x", "n1", 1, clock.t)])
    assert view.forget(["b"]) == 1


def test_a_snapshots_requests_expire_with_their_age() -> None:
    clock = _Clock()
    view, _ = _live_view(clock)
    view.apply_snapshot("a", 1, True, [_routed("a", "old", "n1", 1, clock.t - 299.0),
                                       _routed("a", "new", "n1", 1, clock.t - 1.0)])
    clock.t += 2.0
    view.remote.expire()
    assert view.remote.of("a") == 1  # the one routed 301 s ago is past the 300-s timeout


def test_own_snapshot_lists_the_requests_in_flight_in_a_new_epoch() -> None:
    clock = _Clock()
    view, tracker = _live_view(clock)
    sent: list[RouteDelta] = []
    view.publish = sent.append
    tracker.start("q1", "n1", 50, 14)
    clock.t += 1.0
    tracker.start("q2", "n2", 30, 0)
    tracker.start("q2/decode", "n3", 0, 30)  # a PD request's decode half: not shared alone
    tracker.complete("q1")
    view.routed("q3", "n1", 1, 2, ())
    epoch, deltas = view.snapshot(tracker, 10)
    assert epoch == sent[0].epoch + 1 == view.epoch
    assert [(d.request_id, d.node_id, d.uncached_tokens, d.cached_tokens) for d in deltas] == [
        ("q2", "n2", 30, 0)]
    assert deltas[0].epoch == epoch and deltas[0].sent_at == clock.t
    view.completed("q2")
    assert sent[-1].epoch == epoch
    tracker.start("q4", "n1", 1, 0)
    assert [d.request_id for d in view.snapshot(tracker, 1)[1]] == ["q4"]  # newest kept


def _policy_free(clock: _Clock) -> tuple[LoadTracker, PolicySet]:
    return LoadTracker(clock), PolicySet(names=[])


async def test_a_view_gone_stale_on_an_open_stream_comes_back(tmp_path: Path) -> None:
    """A replica that heard nothing for --share-timeout-s (its event loop or the hub's
    stalled) drops the others' state; with the stream still open it reconnects, so their
    snapshots rebuild it, instead of deciding on its own counts for as long as the stream
    lasts (seen in a loaded stack run: one replica's view lost, 504 of ~2,000 deltas applied)."""
    async with _registry(tmp_path, free_port()) as target:
        a, b = _runtime(target, "ra"), _runtime(target, "rb")
        await a.start()
        await b.start()
        try:
            await _live(a, b)
            vb = _view(b)
            await _route(a, 3, 0)
            await until(lambda: vb.remote.total == 3, what="b counts a's 3 requests")
            vb._last_heard -= vb.timeout_s + 1  # as after a stall longer than the timeout
            assert not vb.live() and vb.remote.total == 0
            lost = vb.lost_total
            # the hub's next keepalive (every second) finds the view stale: b reconnects and
            # a's snapshot brings its requests back, node by node
            await until(lambda: vb.live() and _same_as_own(vb, a) and vb.remote.total == 3,
                         what="b live again, counting a's requests")
            assert vb.lost_total == lost
            await _route(a, 1, 10)
            await until(lambda: vb.remote.total == 4, what="a's later routes reach b")
        finally:
            for rt in (a, b):
                await rt.stop()
