"""ReplicaView: idempotent application of store events (the basis of replica convergence),
and the change fan-out cutting off slow watchers."""

from __future__ import annotations

import numpy as np

from kvroute.index import OFFLOADED
from registry_service.metrics import RegistryMetrics
from registry_service.nodes import Change, Fanout
from registry_service.store.base import (
    Delta,
    DeltaPut,
    LoadResult,
    NodeGone,
    NodePut,
    NodeRecord,
    SnapshotPut,
)
from registry_service.view import ReplicaView


def rec(epoch: int = 1) -> NodeRecord:
    return NodeRecord("a", "h:1", "m", 16, 100, {}, epoch, 7, 10, 0)


def arr(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.uint64)


def view() -> ReplicaView:
    return ReplicaView(Fanout(100), RegistryMetrics(), 30.0)


def blocks(v: ReplicaView) -> list[int]:
    return v.index.blocks(v.nodes["a"].slot).tolist()


def test_echoes_and_replays_are_ignored() -> None:
    v = view()
    history = [NodePut(rec()), DeltaPut("a", 1, Delta(1, 0, False, arr(1, 2), arr())),
               DeltaPut("a", 1, Delta(2, 0, False, arr(3), arr(1))),
               SnapshotPut("a", 1, 1, 2, False, arr(2, 3)),
               DeltaPut("a", 1, Delta(3, 1, False, arr(4), arr()))]
    for ev in history + history:  # everything twice: the watch echo of local writes
        v.apply(ev)
    assert blocks(v) == [2, 3, 4]
    assert v.nodes["a"].applied_seq == 3 and v.nodes["a"].gen == 1
    v.apply(DeltaPut("a", 1, Delta(9, 0, False, arr(99), arr())))  # older generation
    v.apply(DeltaPut("a", 0, Delta(4, 1, False, arr(98), arr())))  # older epoch
    assert blocks(v) == [2, 3, 4]


def test_offloaded_tier_converges_across_replicas() -> None:
    """Deltas and snapshots carry the offloaded tier; a replica that lists the store (snapshot
    + later deltas) ends with the same two tiers as one that followed every event."""
    off = OFFLOADED
    history = [NodePut(rec()),
               DeltaPut("a", 1, Delta(1, 0, False, arr(1, 2), arr(),
                                      stored_offloaded=arr(1, 2, 3))),
               DeltaPut("a", 1, Delta(2, 0, False, arr(), arr(2), removed_offloaded=arr(1))),
               SnapshotPut("a", 1, 1, 2, False, arr(1), arr(2, 3)),
               DeltaPut("a", 1, Delta(3, 1, False, arr(4), arr(), stored_offloaded=arr(4)))]
    a, b = view(), view()
    for ev in history + history:
        a.apply(ev)
    b.reconcile(LoadResult([history[0], history[3], history[4]], 10))
    for v in (a, b):
        slot = v.nodes["a"].slot
        assert v.index.blocks(slot).tolist() == [1, 4]
        assert v.index.blocks(slot, off).tolist() == [2, 3, 4]
        assert v.lookup_tiered([1, 2, 3, 5], "m") == {slot: (1, 2)}


def test_resync_snapshot_replaces_and_reload_converges() -> None:
    a, b = view(), view()
    a.apply(NodePut(rec()))
    a.apply(DeltaPut("a", 1, Delta(1, 0, False, arr(1, 2), arr())))
    a.apply(SnapshotPut("a", 1, 1, 0, True, arr(5, 6)))
    assert blocks(a) == [5, 6] and a.nodes["a"].applied_seq == 0
    # a replica that starts now lists: record + latest snapshot + deltas on it
    b.reconcile(LoadResult([NodePut(rec()), SnapshotPut("a", 1, 1, 0, True, arr(5, 6))], 10))
    assert blocks(b) == blocks(a)
    # a re-registration (new epoch) starts empty; a listing without the node drops it
    a.apply(NodePut(rec(epoch=2)))
    assert blocks(a) == [] and a.index.entries == 0
    a.reconcile(LoadResult([], 11))
    assert "a" not in a.nodes
    b.apply(NodeGone("a", 0))
    assert "a" not in b.nodes and b.index.entries == 0


def test_slow_watcher_is_cut_off_not_waited_on() -> None:
    f = Fanout(16)
    slow, fast = f.subscribe(), f.subscribe()
    for i in range(20):
        f.publish(Change("upsert", f"n{i}"))
        while not fast.queue.empty():
            fast.queue.get_nowait()
    assert slow.overflowed and slow.queue.get_nowait().kind == "overflow"
    assert not fast.overflowed and f.subscribers == 1


async def test_watchers_learn_when_a_node_turns_late() -> None:
    import asyncio

    from kvroute.v1 import registry_pb2 as pb
    from registry_service.core import RegistryCore
    from registry_service.settings import RegistrySettings
    from registry_service.store.memory import MemoryStore

    settings = RegistrySettings(store="memory", lease_ttl_s=30, heartbeat_interval_s=0.2,
                                status_write_interval_s=0)
    core = RegistryCore(settings, MemoryStore(), RegistryMetrics())
    await core.start()
    try:
        await core.register(pb.RegisterNodeRequest(
            node_id="a", address="h:1", model="m", block_size=16, capacity_blocks=10))
        sub = core.fanout.subscribe()
        change = await asyncio.wait_for(sub.queue.get(), 10.0)  # late after 1 s: an upsert
        assert change.kind == "upsert" and change.node_id == "a"
        assert not core.view.nodes["a"].healthy(core.view.late_after_s)
    finally:
        await core.close()


async def test_a_stalled_registry_does_not_make_on_time_nodes_late() -> None:
    """The registry's own loop stalls longer than the late window (a GC pause, a frozen
    process): the node's heartbeats of that time are unread, not missing. The sweep after the
    stall gives on-time nodes one more late window instead of telling watchers they are late;
    a node whose heartbeats really stopped still goes late after it."""
    import asyncio
    import time

    from kvroute.v1 import registry_pb2 as pb
    from registry_service.core import RegistryCore
    from registry_service.settings import RegistrySettings
    from registry_service.store.memory import MemoryStore
    from tests.harness import until

    settings = RegistrySettings(store="memory", lease_ttl_s=30, heartbeat_interval_s=0.2,
                                status_write_interval_s=0)
    core = RegistryCore(settings, MemoryStore(), RegistryMetrics())
    await core.start()
    try:
        reg = await core.register(pb.RegisterNodeRequest(
            node_id="a", address="h:1", model="m", block_size=16, capacity_blocks=10))
        late = core.view.late_after_s  # 1 s
        beat = pb.HeartbeatRequest(node_id="a", epoch=reg.record.epoch,
                                   write_token=reg.write_token)
        for _ in range(3):  # beating: every sweep sees the node on time
            await core.heartbeat(beat)
            await asyncio.sleep(0.3)
        await core.heartbeat(beat)
        t0 = time.monotonic()
        time.sleep(late + 1.5)  # noqa: ASYNC251 - the loop stalls: no heartbeat is read
        state = core.view.nodes["a"]
        await until(lambda: state.trusted_until_ms > 0, 5.0, "the sweep after the stall")
        assert state.healthy(late), "an on-time node went late after the registry's stall"
        # no heartbeat comes after all: late once the extra window has passed
        await until(lambda: not state.healthy(late), 10.0, "the node went late")
        assert not state.healthy(late) and time.monotonic() - t0 >= 2 * late + 1.5
    finally:
        await core.close()


async def test_a_lookup_right_after_a_stall_sees_on_time_nodes_healthy() -> None:
    """The first thing the loop runs after its stall may be a queued Lookup, before the health
    sweep: it must not report the node late either (the read forgives the stall itself)."""
    import asyncio
    import time

    from kvroute.v1 import registry_pb2 as pb
    from registry_service.core import RegistryCore
    from registry_service.settings import RegistrySettings
    from registry_service.store.memory import MemoryStore

    settings = RegistrySettings(store="memory", lease_ttl_s=30, heartbeat_interval_s=0.2,
                                status_write_interval_s=0)
    core = RegistryCore(settings, MemoryStore(), RegistryMetrics())
    await core.start()
    try:
        late = core.view.late_after_s  # 1 s
        gone = await core.register(pb.RegisterNodeRequest(
            node_id="b", address="h:2", model="m", block_size=16, capacity_blocks=10))
        await core.heartbeat(pb.HeartbeatRequest(node_id="b", epoch=gone.record.epoch,
                                                 write_token=gone.write_token))
        await asyncio.sleep(late + 0.7)  # b stopped beating: late before the stall
        reg = await core.register(pb.RegisterNodeRequest(
            node_id="a", address="h:1", model="m", block_size=16, capacity_blocks=10))
        await core.heartbeat(pb.HeartbeatRequest(node_id="a", epoch=reg.record.epoch,
                                                 write_token=reg.write_token))
        await asyncio.sleep(0.6)  # the sweep has run since the heartbeat
        time.sleep(late + 1.5)  # noqa: ASYNC251 - the loop stalls: no heartbeat is read
        # no await between the stall and the read: the sweep cannot have run
        got = core.reads.lookup(pb.LookupRequest(model="m", block_hashes=[1],
                                                 include_unhealthy=True))
        health = {n.node_id: n.healthy for n in got.nodes}
        assert health == {"a": True, "b": False}, got  # a late node is not forgiven
        assert {n.node_id: n.healthy for n in core.reads.list_nodes("m")} == health
    finally:
        await core.close()


def test_candidates_and_lookup_per_model_follow_membership() -> None:
    v = view()

    def node(nid: str, model: str, epoch: int = 1) -> NodeRecord:
        return NodeRecord(nid, f"{nid}:1", model, 16, 100, {}, epoch, 7, 10, 0)

    for nid, model in (("a", "m"), ("b", "m"), ("c", "x")):
        v.apply(NodePut(node(nid, model)))
        v.apply(DeltaPut(nid, 1, Delta(1, 0, False, arr(1, 2, 3), arr())))
    assert [s.node_id for s in v.candidates("m", True)] == ["a", "b"]
    slots = {nid: v.nodes[nid].slot for nid in "abc"}
    assert v.lookup([1, 2, 9], "m") == {slots["a"]: 2, slots["b"]: 2}
    assert v.lookup([1, 2, 9], "") == {s: 2 for s in slots.values()}
    assert v.lookup([], "m") == {} and v.lookup([1], "nope") == {}
    v.apply(NodeGone("a", 0))
    assert [s.node_id for s in v.candidates("m", True)] == ["b"]
    assert v.lookup([1], "m") == {slots["b"]: 1}
    v.apply(NodePut(node("c", "m", epoch=2)))  # c registers again, now for model m, empty
    assert [s.node_id for s in v.candidates("m", True)] == ["b", "c"]
    assert v.candidates("x", True) == [] and v.lookup([1], "m") == {slots["b"]: 1}


def test_a_restarted_replica_trusts_live_leases_until_it_hears_from_the_node() -> None:
    """Issue 15: a node whose lease is alive in etcd is healthy on a fresh replica although
    its last heartbeat (written to etcd long ago) is late; timing rules again once a newer
    status arrives, and a heartbeat being processed keeps the node healthy."""
    from registry_service.nodes import now_ms
    from registry_service.store.base import NodeStatus, StatusPut

    late = ReplicaView(Fanout(100), RegistryMetrics(), 1.0)
    old = now_ms() - 60_000
    stale = NodeRecord("a", "h:1", "m", 16, 100, {}, 1, 7, 10, old)
    late.reconcile(LoadResult([NodePut(stale), StatusPut("a", NodeStatus(heartbeat_unix_ms=old))]))
    state = late.nodes["a"]
    assert state.healthy(1.0)  # lease alive (listed), not heard from yet: trusted
    assert not state.healthy(1.0, now_ms() + 11_000)  # trust ends with the lease TTL (10 s)
    late.apply(StatusPut("a", NodeStatus(heartbeat_unix_ms=old + 1)))  # heard of: still late
    assert not state.healthy(1.0)
    state.beating = 1  # a heartbeat waiting on a stalled etcd
    assert state.healthy(1.0)
