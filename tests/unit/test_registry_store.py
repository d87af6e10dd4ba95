"""One PlacementStore test suite, run against the memory store and a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from registry_service.store.base import (
    Delta,
    DeltaPut,
    NodeGone,
    NodePut,
    NodeRecord,
    NodeStatus,
    PlacementStore,
    SnapshotPut,
    StatusPut,
    StoreConflict,
    StoreEvent,
    WatchRestart,
    decode_delta,
    decode_snapshot,
    encode_delta,
    encode_snapshot,
    join_chunks,
)
from registry_service.store.etcd import EtcdStore
from registry_service.store.etcd_client import EtcdSettings
from registry_service.store.memory import MemoryStore

Factory = Callable[[], PlacementStore]


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.integration)])
async def stores(request: pytest.FixtureRequest, etcd_prefix: str,
                 ) -> AsyncIterator[Factory]:
    """A factory of stores sharing one backend (two replicas of the same state)."""
    made: list[PlacementStore] = []
    shared = MemoryStore(expiry_check_s=0.05)
    if request.param == "etcd":
        endpoint = request.getfixturevalue("etcd_endpoint")
        settings = EtcdSettings(etcd_endpoints=(endpoint,), etcd_prefix=etcd_prefix,
                                etcd_call_timeout_s=2.0)

        def make() -> PlacementStore:
            s = EtcdStore(settings, chunk_bytes=4096)
            made.append(s)
            return s
    else:
        def make() -> PlacementStore:
            if not made:
                made.append(shared)
            return shared
    yield make
    for s in made:
        await s.close()


def rec(node: str = "n1", epoch: int = 1, ttl: int = 5, address: str = "h:1") -> NodeRecord:
    return NodeRecord(node_id=node, address=address, model="m", block_size=16,
                      capacity_blocks=100, labels={"zone": "a"}, epoch=epoch, lease_id=0,
                      lease_ttl_s=ttl, registered_unix_ms=1)


def arr(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.uint64)


async def started(make: Factory) -> PlacementStore:
    s = make()
    await s.start()
    return s


async def collect(it: AsyncIterator[list[StoreEvent]], until: Callable[[StoreEvent], bool],
                  wait_s: float = 5.0) -> list[StoreEvent]:
    seen: list[StoreEvent] = []

    async def run() -> None:
        async for batch in it:
            seen.extend(batch)
            if any(until(e) for e in batch):
                return
    await asyncio.wait_for(run(), wait_s)
    return seen


async def test_register_load_and_conflict(stores: Factory) -> None:
    s = await started(stores)
    r = await s.register_node(rec(), None)
    assert r.lease_id != 0
    assert await s.get_node("n1") == r
    loaded = await s.load()
    assert NodePut(r) in loaded.events
    with pytest.raises(StoreConflict):
        await s.register_node(rec(epoch=2), None)  # stale view of the previous record
    r2 = await s.register_node(rec(epoch=2), r)
    assert (await s.get_node("n1")) == r2 and r2.lease_id != r.lease_id
    assert await s.refresh_lease(r) == 0  # the old incarnation's lease is revoked


async def test_deltas_snapshots_and_reload(stores: Factory) -> None:
    s = await started(stores)
    r = await s.register_node(rec(), None)
    big = np.arange(1, 3000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    assert await s.append_delta(r, Delta(1, 0, False, big, arr()))
    assert not await s.append_delta(r, Delta(1, 0, False, big, arr()))  # retry of seq 1
    assert await s.append_delta(r, Delta(2, 0, False, arr(7), arr(int(big[0]))))
    await s.write_snapshot(r, 1, 2, np.sort(np.append(big[1:], np.uint64(7))), False)
    assert await s.append_delta(r, Delta(3, 1, True, arr(8, 9), arr()))
    await s.put_status(r, NodeStatus(used_blocks=5, heartbeat_unix_ms=10))
    loaded = await (await started(stores)).load()
    snaps = [e for e in loaded.events if isinstance(e, SnapshotPut)]
    deltas = [e for e in loaded.events if isinstance(e, DeltaPut)]
    assert len(snaps) == 1 and snaps[0].gen == 1 and snaps[0].through_seq == 2
    assert snaps[0].hashes.size == big.size  # 2998 old + 7, across several 4 KiB chunks
    assert [d.delta.seq for d in deltas] == [3] and deltas[0].delta.cleared
    assert [e.status.used_blocks for e in loaded.events if isinstance(e, StatusPut)] == [5]
    await s.write_snapshot(r, 2, 0, arr(1, 2), True)  # a resync drops every delta
    loaded = await s.load()
    assert not [e for e in loaded.events if isinstance(e, DeltaPut)]
    assert [e.hashes.tolist() for e in loaded.events if isinstance(e, SnapshotPut)] == [[1, 2]]


async def test_offloaded_tier_in_deltas_and_snapshots(stores: Factory) -> None:
    """The offloaded (lower) tier survives the store: deltas and chunked snapshots carry it,
    a reload and a second replica see it, and a device-only value is still version 1."""
    s = await started(stores)
    r = await s.register_node(rec(), None)
    off = np.arange(1, 1200, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    assert await s.append_delta(r, Delta(1, 0, False, arr(1, 2), arr(),
                                         stored_offloaded=off, removed_offloaded=arr(5)))
    loaded = await (await started(stores)).load()
    [d] = [e.delta for e in loaded.events if isinstance(e, DeltaPut)]
    assert d.stored.tolist() == [1, 2] and d.stored_offloaded.tolist() == off.tolist()
    assert d.removed_offloaded.tolist() == [5] and d.removed.size == 0
    await s.write_snapshot(r, 1, 1, arr(1, 2), False, np.sort(off))  # several 4 KiB chunks
    assert await s.append_delta(r, Delta(2, 1, False, arr(3), arr()))
    loaded = await (await started(stores)).load()
    [snap] = [e for e in loaded.events if isinstance(e, SnapshotPut)]
    assert snap.hashes.tolist() == [1, 2] and snap.offloaded.tolist() == np.sort(off).tolist()
    [d2] = [e.delta for e in loaded.events if isinstance(e, DeltaPut)]
    assert d2.stored.tolist() == [3] and not d2.has_offloaded


def test_version_1_values_stay_readable() -> None:
    """Values written by registries before the offloaded tier decode as device-only, and a
    device-only value is still written as version 1 (older replicas keep reading it)."""
    v1_delta = struct.pack("<4sQQBI", b"KVD1", 0, 4, 1, 2) + arr(7, 8, 9).astype("<u8").tobytes()
    d = decode_delta(v1_delta)
    assert (d.seq, d.cleared, d.stored.tolist(), d.removed.tolist()) == (4, True, [7, 8], [9])
    assert d.stored_offloaded.size == 0 and encode_delta(d) == v1_delta
    v1_snap = struct.pack("<4sQQIIB", b"KVS1", 3, 2, 0, 1, 0) + arr(1, 2).astype("<u8").tobytes()
    c = decode_snapshot(v1_snap)
    assert (c.gen, c.through_seq, c.hashes.tolist(), c.tier) == (3, 2, [1, 2], 0)
    assert encode_snapshot(3, 2, arr(1, 2), False, 1 << 20) == [v1_snap]
    values = encode_snapshot(3, 2, arr(1, 2), False, 1 << 20, arr(5))
    assert [v[:4] for v in values] == [b"KVS2", b"KVS2"]
    dev, off = join_chunks([decode_snapshot(v) for v in values])
    assert dev.tolist() == [1, 2] and off.tolist() == [5]
    for bad in (b"KVD2" + bytes(40), b"KVD2" + bytes(5)):
        with pytest.raises(ValueError):
            decode_delta(bad)


async def test_large_snapshot_over_several_transactions(
        stores: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("registry_service.store.etcd.TXN_BUDGET_BYTES", 10_000)
    s = await started(stores)
    r = await s.register_node(rec("big"), None)
    await s.append_delta(r, Delta(1, 0, False, arr(1), arr()))
    hashes = np.arange(10, 5010, dtype=np.uint64)  # 40 KB: 10 chunks, 11 transactions
    await s.write_snapshot(r, 1, 0, hashes, True)
    loaded = await (await started(stores)).load()
    snaps = [e for e in loaded.events if isinstance(e, SnapshotPut) and e.node_id == "big"]
    assert len(snaps) == 1 and snaps[0].hashes.tolist() == hashes.tolist()
    assert not [e for e in loaded.events if isinstance(e, DeltaPut) and e.node_id == "big"]


async def test_watch_sees_other_writer_and_delete(stores: Factory) -> None:
    a, b = await started(stores), await started(stores)
    start = (await b.load()).revision
    it = b.watch(start)
    r = await a.register_node(rec("w1"), None)
    await a.append_delta(r, Delta(1, 0, False, arr(1, 2, 3), arr()))
    await a.write_snapshot(r, 1, 0, arr(4, 5), True)
    await a.delete_node(r)
    seen = await collect(it, lambda e: isinstance(e, NodeGone))
    kinds = [type(e).__name__ for e in seen if getattr(e, "node_id", None) == "w1"
             or (isinstance(e, NodePut) and e.record.node_id == "w1")]
    assert kinds[0] == "NodePut" and "DeltaPut" in kinds and kinds[-1] == "NodeGone"
    snap = next(e for e in seen if isinstance(e, SnapshotPut))
    assert snap.replace and snap.hashes.tolist() == [4, 5]
    assert (await a.load()).events == [] or all(
        getattr(e, "node_id", "") != "w1" for e in (await a.load()).events)
    with contextlib.suppress(Exception):
        await it.aclose()  # type: ignore[attr-defined]


async def test_lease_expiry_removes_every_key(stores: Factory) -> None:
    s = await started(stores)
    start = (await s.load()).revision
    it = s.watch(start)
    r = await s.register_node(rec("x1", ttl=1), None)
    await s.append_delta(r, Delta(1, 0, False, arr(1), arr()))
    seen = await collect(it, lambda e: isinstance(e, NodeGone), wait_s=8)
    assert any(isinstance(e, NodeGone) and e.node_id == "x1" for e in seen)
    assert await s.get_node("x1") is None
    assert all(getattr(e, "node_id", "") != "x1" for e in (await s.load()).events)
    with pytest.raises(StoreConflict):
        await s.append_delta(r, Delta(2, 0, False, arr(2), arr()))


async def test_watch_from_a_compacted_revision_must_relist(stores: Factory) -> None:
    s = await started(stores)
    start = (await s.load()).revision
    r = await s.register_node(rec("c1"), None)
    for seq in range(1, 6):
        await s.append_delta(r, Delta(seq, 0, False, arr(seq), arr()))
    if isinstance(s, EtcdStore):
        await s.client.compact(await s.client.revision())
    else:
        assert isinstance(s, MemoryStore)
        s._log_limit = 2  # keep only the last two changes
        await s.append_delta(r, Delta(6, 0, False, arr(6), arr()))
    with pytest.raises(WatchRestart):
        await collect(s.watch(start), lambda e: False, wait_s=5)
    loaded = await s.load()  # what a replica does next: list, then watch from there
    assert [e.delta.seq for e in loaded.events if isinstance(e, DeltaPut)][:5] == [1, 2, 3, 4, 5]


async def test_core_relists_when_its_watch_restarts() -> None:
    from registry_service.core import RegistryCore
    from registry_service.metrics import RegistryMetrics
    from registry_service.settings import RegistrySettings

    class Flaky(MemoryStore):
        restarts = 0

        async def watch(self, revision: int) -> AsyncIterator[list[StoreEvent]]:
            if self.restarts == 0:
                self.restarts += 1
                raise WatchRestart("compacted (test)")
            async for batch in super().watch(revision):
                yield batch

    store = Flaky()
    metrics = RegistryMetrics()
    core = RegistryCore(RegistrySettings(store="memory"), store, metrics)
    await core.start()
    try:
        r = await store.register_node(rec("z"), None)  # written by "another replica"
        await store.append_delta(r, Delta(1, 0, False, arr(1, 2), arr()))
        for _ in range(100):
            if "z" in core.view.nodes and core.view.nodes["z"].applied_seq == 1:
                break
            await asyncio.sleep(0.02)
        assert core.view.index.blocks(core.view.nodes["z"].slot).tolist() == [1, 2]
        assert store.restarts == 1
        assert metrics.store_relists._value.get() >= 2  # start + after the restart
    finally:
        await core.close()
