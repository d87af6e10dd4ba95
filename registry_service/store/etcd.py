"""``PlacementStore`` on etcd (DESIGN §4), through :class:`EtcdClient`.

Keys under the prefix ``P`` (default ``/kvroute/v1/``), all attached to the node's lease:

- ``P nodes/<node_id>``: the node record (JSON, includes the lease id and epoch);
- ``P status/<node_id>``: latest usage (JSON), written at most every status interval;
- ``P placement/<node_id>/<epoch>/snap/<gen>.<chunk>``: the node's whole block set as of
  snapshot generation ``gen`` (packed ``<u8`` hashes, at most 1 MiB per key);
- ``P placement/<node_id>/<epoch>/delta/<seq>``: one heartbeat's stored/removed hashes on top
  of its base generation (packed ``<u8``);
- ``P hubs/<hub_id>``: a registry replica's RouteShare hub (JSON address), on that replica's
  own lease (:mod:`registry_service.store.etcd_hubs`; ignored by the placement follower).

Offloaded (lower-tier) blocks travel in the same keys: a snapshot chunk tagged with its tier, a
delta with offloaded stored/removed lists (value version 2, written only when the offloaded
tier is involved; version 1 values, from older registries too, read as device-only).

A snapshot counts once all its chunks exist; deltas apply only on their base generation, so a
crash between the writes of a large snapshot never mixes generations. Old generations and
superseded deltas are deleted when a snapshot is written, so a lease holds tens of keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict

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
    SnapChunk,
    SnapshotPut,
    StatusPut,
    StoreConflict,
    StoreEvent,
    StoreUnavailable,
    WatchRestart,
    decode_delta,
    decode_snapshot,
    encode_delta,
    encode_snapshot,
    join_chunks,
)
from registry_service.store.etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdSettings,
    KeyValue,
    Op,
    WatchCompacted,
    WatchEvent,
    compare_lease,
    compare_value,
    compare_version,
    op_delete,
    op_delete_prefix,
    op_get,
    op_put,
)
from registry_service.store.etcd_hubs import EtcdHubDirectory
from registry_service.store.hubs import HubDirectory

log = logging.getLogger(__name__)

TXN_BUDGET_BYTES = 1_400_000
"""Largest transaction we send (etcd's default --max-request-bytes is 1.5 MiB)."""


def _record_bytes(rec: NodeRecord) -> bytes:
    return json.dumps(asdict(rec), sort_keys=True, separators=(",", ":")).encode()


def _record(data: bytes) -> NodeRecord:
    return NodeRecord(**json.loads(data))


def _status_bytes(st: NodeStatus) -> bytes:
    return json.dumps(asdict(st), separators=(",", ":")).encode()


class EtcdStore(PlacementStore):
    """Placement in etcd under per-node leases."""

    def __init__(self, settings: EtcdSettings, chunk_bytes: int = 1 << 20,
                 client: EtcdClient | None = None) -> None:
        self.client = client or EtcdClient(settings)
        self.prefix = settings.etcd_prefix.encode()
        self.chunk_bytes = chunk_bytes
        self._written = 0
        self._chunks: dict[tuple[str, int, int], dict[int, SnapChunk]] = {}

    # ---- keys -------------------------------------------------------------------------------
    def _node_key(self, node_id: str) -> bytes:
        return self.prefix + b"nodes/" + node_id.encode()

    def _status_key(self, node_id: str) -> bytes:
        return self.prefix + b"status/" + node_id.encode()

    def _placement(self, node_id: str, epoch: int | None = None) -> bytes:
        base = self.prefix + b"placement/" + node_id.encode() + b"/"
        return base if epoch is None else base + b"%020d/" % epoch

    def _parse(self, kv: KeyValue, deleted: bool) -> StoreEvent | None:
        rest = kv.key[len(self.prefix):].decode()
        kind, _, tail = rest.partition("/")
        if kind == "nodes":
            return NodeGone(tail, 0) if deleted else NodePut(_record(kv.value))
        if kind == "status":
            return None if deleted else StatusPut(tail, NodeStatus(**json.loads(kv.value)))
        if kind != "placement" or deleted:
            return None
        node_id, epoch_s, what, _name = tail.rsplit("/", 3)
        epoch = int(epoch_s)
        if what == "delta":
            return DeltaPut(node_id, epoch, decode_delta(kv.value))
        if what == "snap":
            chunk = decode_snapshot(kv.value)
            parts = self._chunks.setdefault((node_id, epoch, chunk.gen), {})
            parts[chunk.chunk] = chunk
            if len(parts) < chunk.chunks:
                return None
            del self._chunks[(node_id, epoch, chunk.gen)]
            for key in [k for k in self._chunks if k[:2] == (node_id, epoch) and k[2] < chunk.gen]:
                del self._chunks[key]
            hashes, offloaded = join_chunks([parts[i] for i in range(chunk.chunks)])
            return SnapshotPut(node_id, epoch, chunk.gen, chunk.through_seq, chunk.replace,
                               hashes, offloaded)
        return None

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.client.connect()
        except EtcdError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self.client.close()

    def bytes_written(self) -> int:
        return self._written

    def hubs(self) -> HubDirectory:
        """``P hubs/<hub_id>`` records, each on its registry replica's own lease."""
        return EtcdHubDirectory(self.client, self.prefix)

    def _count(self, ops: list[Op]) -> list[Op]:
        self._written += sum(len(o.key) + len(o.value) for o in ops if o.kind == "put")
        return ops

    # ---- writes -----------------------------------------------------------------------------
    async def get_node(self, node_id: str) -> NodeRecord | None:
        kv = await self.client.get(self._node_key(node_id))
        return None if kv is None else _record(kv.value)

    async def register_node(self, record: NodeRecord, previous: NodeRecord | None) -> NodeRecord:
        key = self._node_key(record.node_id)
        lease = await self.client.lease_grant(record.lease_ttl_s)
        rec = NodeRecord(**{**asdict(record), "lease_id": lease})
        cmp = (compare_value(key, "==", _record_bytes(previous)) if previous
               else compare_version(key, "==", 0))
        ops = self._count([op_put(key, _record_bytes(rec), lease),
                           op_delete(self._status_key(rec.node_id)),
                           op_delete_prefix(self._placement(rec.node_id))])
        res = await self.client.txn([cmp], ops, [])
        if not res.succeeded:
            await self._revoke(lease)
            raise StoreConflict(f"node {record.node_id} changed concurrently")
        if previous is not None and previous.lease_id != lease:
            await self._revoke(previous.lease_id)
        return rec

    async def _revoke(self, lease: int) -> None:
        with contextlib.suppress(EtcdLeaseNotFound):
            await self.client.lease_revoke(lease)

    async def refresh_lease(self, record: NodeRecord) -> int:
        return await self.client.lease_keepalive(record.lease_id)

    async def put_status(self, record: NodeRecord, status: NodeStatus) -> None:
        ops = self._count([op_put(self._status_key(record.node_id), _status_bytes(status),
                                  record.lease_id)])
        with contextlib.suppress(EtcdLeaseNotFound):
            await self.client.txn([compare_lease(self._node_key(record.node_id), "==",
                                                 record.lease_id)], ops, [])

    async def append_delta(self, record: NodeRecord, delta: Delta) -> bool:
        node_key = self._node_key(record.node_id)
        key = self._placement(record.node_id, record.epoch) + b"delta/%012d" % delta.seq
        ops = [op_put(key, encode_delta(delta), record.lease_id)]
        try:
            res = await self.client.txn(
                [compare_lease(node_key, "==", record.lease_id), compare_version(key, "==", 0)],
                ops, [op_get(key)])
        except EtcdLeaseNotFound as exc:
            raise StoreConflict(f"lease of node {record.node_id} is gone") from exc
        if res.succeeded:
            self._count(ops)
            return True
        if res.gets and res.gets[0]:
            return False
        raise StoreConflict(f"node {record.node_id} epoch {record.epoch} is no longer current")

    async def write_snapshot(self, record: NodeRecord, gen: int, through_seq: int,
                             hashes: HashArray, replace: bool,
                             offloaded: HashArray | None = None) -> None:
        base = self._placement(record.node_id, record.epoch)
        cmp = [compare_lease(self._node_key(record.node_id), "==", record.lease_id)]
        values = encode_snapshot(gen, through_seq, hashes, replace, self.chunk_bytes, offloaded)
        puts = [op_put(base + b"snap/%012d.%06d" % (gen, i), v, record.lease_id)
                for i, v in enumerate(values)]
        deletes = [Op("delete", base + b"snap/", range_end=base + b"snap/%012d" % gen),
                   Op("delete", base + b"delta/",
                      range_end=base + b"delta/%012d" % (through_seq + 1))
                   if not replace else op_delete_prefix(base + b"delta/")]
        try:
            if sum(len(v) for v in values) <= TXN_BUDGET_BYTES:
                ok = (await self.client.txn(cmp, [*puts, *deletes], [])).succeeded
            else:
                ok = True
                for p in puts:  # a generation counts only once every chunk exists
                    ok = ok and (await self.client.txn(cmp, [p], [])).succeeded
                ok = ok and (await self.client.txn(cmp, deletes, [])).succeeded
        except EtcdLeaseNotFound as exc:
            raise StoreConflict(f"lease of node {record.node_id} is gone") from exc
        if not ok:
            raise StoreConflict(f"node {record.node_id} epoch {record.epoch} is no longer current")
        self._count(puts)

    async def delete_node(self, record: NodeRecord) -> None:
        await self.client.txn(
            [compare_lease(self._node_key(record.node_id), "==", record.lease_id)],
            [op_delete(self._node_key(record.node_id)), op_delete(self._status_key(record.node_id)),
             op_delete_prefix(self._placement(record.node_id))], [])
        await self._revoke(record.lease_id)

    # ---- reads ------------------------------------------------------------------------------
    async def load(self) -> LoadResult:
        """Node records first (their revision is where the watch resumes), then status, then
        each node's placement in its own read: no single response grows with the fleet. Later
        reads may already hold changes the watch replays; applying them is idempotent."""
        kvs, revision = await self.client.get_prefix(self.prefix + b"nodes/")
        kvs += (await self.client.get_prefix(self.prefix + b"status/"))[0]
        nodes = [ev.record for ev in map(self._event, [WatchEvent("put", kv) for kv in kvs])
                 if isinstance(ev, NodePut)]
        for i in range(0, len(nodes), 16):
            reads = await asyncio.gather(*(
                self.client.get_prefix(self._placement(r.node_id, r.epoch))
                for r in nodes[i:i + 16]))
            for got, _ in reads:
                kvs += got
        self._chunks.clear()
        records: dict[str, NodeRecord] = {}
        status: list[StoreEvent] = []
        snaps: dict[str, SnapshotPut] = {}
        deltas: list[DeltaPut] = []
        for kv in kvs:
            ev = self._event(WatchEvent("put", kv))
            if isinstance(ev, NodePut):
                records[ev.record.node_id] = ev.record
            elif isinstance(ev, StatusPut):
                status.append(ev)
            elif isinstance(ev, SnapshotPut):
                if ev.node_id not in snaps or snaps[ev.node_id].gen < ev.gen:
                    snaps[ev.node_id] = ev
            elif isinstance(ev, DeltaPut):
                deltas.append(ev)
        self._chunks.clear()
        out: list[StoreEvent] = [NodePut(r) for r in records.values()]
        out += status
        out += [s for s in snaps.values()
                if s.node_id in records and s.epoch == records[s.node_id].epoch]

        def current(d: DeltaPut) -> bool:
            snap = snaps.get(d.node_id)
            rec = records.get(d.node_id)
            return (rec is not None and d.epoch == rec.epoch
                    and d.delta.base_gen == (snap.gen if snap else 0))

        kept = sorted(filter(current, deltas), key=lambda d: (d.node_id, d.delta.seq))
        out += kept
        return LoadResult(out, revision)

    async def watch(self, revision: int) -> AsyncIterator[list[StoreEvent]]:
        try:
            async for batch in self.client.watch_prefix(self.prefix, revision + 1):
                out = [ev for ev in map(self._event, batch) if ev is not None]
                if out:
                    yield out
        except WatchCompacted as exc:
            raise WatchRestart(str(exc)) from exc

    def _event(self, we: WatchEvent) -> StoreEvent | None:
        try:
            return self._parse(we.kv, deleted=we.kind == "delete")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            log.warning("ignoring malformed etcd key %r: %s", we.kv.key[:200], exc)
            return None
