"""In-process ``PlacementStore`` for unit tests and single-process benchmarks (never durable).

Same semantics as the etcd store: leases that expire (taking the node's keys with them), a
revision-numbered change log that ``watch`` follows, compare-and-swap registration.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import AsyncIterator

from kvroute.aio import cancel_and_wait
from registry_service.store.base import (
    Delta,
    DeltaPut,
    HashArray,
    LoadResult,
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
    as_hashes,
    encode_delta,
    encode_snapshot,
)


class MemoryStore(PlacementStore):
    """A PlacementStore in a dict. ``log_limit`` bounds the change log kept for watchers."""

    def __init__(self, log_limit: int = 100_000, expiry_check_s: float = 0.1) -> None:
        self._nodes: dict[str, NodeRecord] = {}
        self._lease_deadline: dict[int, float] = {}
        self._status: dict[str, NodeStatus] = {}
        self._deltas: dict[str, dict[int, Delta]] = {}
        self._snap: dict[str, SnapshotPut] = {}
        self._log: list[tuple[int, StoreEvent]] = []
        self._rev = 0
        self._log_limit = log_limit
        self._changed = asyncio.Event()
        self._lease_ids = itertools.count(1)
        self._expiry_check_s = expiry_check_s
        self._reaper: asyncio.Task[None] | None = None
        self._bytes = 0
        self._closed = False

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap())

    async def close(self) -> None:
        self._closed = True
        self._changed.set()
        await cancel_and_wait(self._reaper)

    def bytes_written(self) -> int:
        return self._bytes

    def _emit(self, *events: StoreEvent) -> None:
        self._rev += 1
        for ev in events:
            self._log.append((self._rev, ev))
        if len(self._log) > self._log_limit:
            del self._log[: len(self._log) - self._log_limit]
        self._changed.set()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self._expiry_check_s)
            now = time.monotonic()
            for rec in list(self._nodes.values()):
                if self._lease_deadline.get(rec.lease_id, 0.0) < now:
                    self._drop(rec)

    def _drop(self, rec: NodeRecord) -> None:
        self._nodes.pop(rec.node_id, None)
        self._lease_deadline.pop(rec.lease_id, None)
        self._status.pop(rec.node_id, None)
        self._deltas.pop(rec.node_id, None)
        self._snap.pop(rec.node_id, None)
        self._emit(NodeGone(rec.node_id, rec.epoch))

    def _live(self, rec: NodeRecord) -> bool:
        cur = self._nodes.get(rec.node_id)
        return cur is not None and cur.epoch == rec.epoch and cur.lease_id == rec.lease_id

    async def get_node(self, node_id: str) -> NodeRecord | None:
        return self._nodes.get(node_id)

    async def register_node(self, record: NodeRecord, previous: NodeRecord | None) -> NodeRecord:
        cur = self._nodes.get(record.node_id)
        if cur != previous:
            raise StoreConflict(f"node {record.node_id} changed concurrently")
        if cur is not None:
            self._drop(cur)
        lease = next(self._lease_ids)
        self._lease_deadline[lease] = time.monotonic() + record.lease_ttl_s
        rec = NodeRecord(**{**record.__dict__, "lease_id": lease})
        self._nodes[rec.node_id] = rec
        self._deltas[rec.node_id] = {}
        self._bytes += len(repr(rec))
        self._emit(NodePut(rec))
        return rec

    async def refresh_lease(self, record: NodeRecord) -> int:
        if record.lease_id not in self._lease_deadline:
            return 0
        self._lease_deadline[record.lease_id] = time.monotonic() + record.lease_ttl_s
        return record.lease_ttl_s

    async def put_status(self, record: NodeRecord, status: NodeStatus) -> None:
        if not self._live(record):
            return
        self._status[record.node_id] = status
        self._bytes += 64
        self._emit(StatusPut(record.node_id, status))

    async def append_delta(self, record: NodeRecord, delta: Delta) -> bool:
        if not self._live(record):
            raise StoreConflict(f"node {record.node_id} epoch {record.epoch} is gone")
        deltas = self._deltas[record.node_id]
        if delta.seq in deltas:
            return False
        deltas[delta.seq] = delta
        self._bytes += len(encode_delta(delta)) + 48
        self._emit(DeltaPut(record.node_id, record.epoch, delta))
        return True

    async def write_snapshot(self, record: NodeRecord, gen: int, through_seq: int,
                             hashes: HashArray, replace: bool,
                             offloaded: HashArray | None = None) -> None:
        if not self._live(record):
            raise StoreConflict(f"node {record.node_id} epoch {record.epoch} is gone")
        off = as_hashes([]) if offloaded is None else offloaded.copy()
        snap = SnapshotPut(record.node_id, record.epoch, gen, through_seq, replace, hashes.copy(),
                           off)
        self._snap[record.node_id] = snap
        self._deltas[record.node_id] = {
            s: d for s, d in self._deltas[record.node_id].items()
            if not replace and d.base_gen >= gen}
        self._bytes += sum(len(v) + 48 for v in
                           encode_snapshot(gen, through_seq, hashes, replace, 1 << 20, off))
        self._emit(snap)

    async def delete_node(self, record: NodeRecord) -> None:
        cur = self._nodes.get(record.node_id)
        if cur is not None and cur.epoch == record.epoch:
            self._drop(cur)

    async def load(self) -> LoadResult:
        out: list[StoreEvent] = []
        for node_id, rec in self._nodes.items():
            out.append(NodePut(rec))
            if node_id in self._status:
                out.append(StatusPut(node_id, self._status[node_id]))
            if node_id in self._snap:
                out.append(self._snap[node_id])
            out.extend(DeltaPut(node_id, rec.epoch, d)
                       for _, d in sorted(self._deltas[node_id].items()))
        return LoadResult(out, self._rev)

    async def watch(self, revision: int) -> AsyncIterator[list[StoreEvent]]:
        pos = revision
        while not self._closed:
            if self._log and self._log[0][0] > pos + 1 and pos < self._rev:
                raise WatchRestart(f"revision {pos} compacted")
            start = bisect.bisect_right(self._log, pos, key=lambda item: item[0])
            batch = [ev for _, ev in self._log[start:]]
            if batch:
                pos = self._rev
                yield batch
                continue
            self._changed.clear()
            await self._changed.wait()
