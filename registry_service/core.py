"""The registry's behaviour: registration, heartbeats, resync, deregistration; the reads
(:mod:`registry_service.reads`) and following the store (:mod:`registry_service.follow`) are
composed here, so the servicer only adapts gRPC to this core.

Writes go to the placement store first and are applied to this replica's view once the store
accepted them; every replica also follows the store (list, then watch from the listed
revision; list again when the watch is compacted away), so any replica serves any node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from kvroute.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KvrouteError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from kvroute.v1 import registry_pb2 as pb
from registry_service import limits, validate
from registry_service.auth import CALLER
from registry_service.follow import StoreFollower
from registry_service.metrics import RegistryMetrics
from registry_service.nodes import Change, Fanout, LiveNode, now_ms
from registry_service.reads import RegistryReads
from registry_service.settings import RegistrySettings
from registry_service.store.base import (
    Delta,
    NodeGone,
    NodePut,
    NodeRecord,
    NodeStatus,
    PlacementStore,
    SnapshotPut,
    StoreConflict,
    StoreUnavailable,
    as_hashes,
)
from registry_service.view import ReplicaView

log = logging.getLogger(__name__)
T = TypeVar("T")
DELTA_KEY_MAX_BYTES = 1 << 20
"""A heartbeat delta larger than this is persisted as a (chunked) snapshot instead of one
delta key: etcd refuses requests over --max-request-bytes (1.5 MiB by default)."""
REFRESH_SKIP_FRACTION = 0.1
"""A heartbeat within this fraction of the TTL after this replica refreshed the node's lease
does not refresh it again (the lease still has >= 90% left): saves an etcd round trip per
heartbeat in bursts, and never lets a lease run out sooner than 0.9 x TTL after a heartbeat."""


@dataclass(frozen=True)
class Registration:
    """What RegisterNode answers: the stored record and the write token (shown only here)."""

    record: NodeRecord
    write_token: str


@dataclass(frozen=True)
class HeartbeatResult:
    """What a heartbeat answers."""

    resync_required: bool
    lease_ttl_s: int
    reason: str = ""


class RegistryCore:
    """One replica: a store, the view that follows it, and the RPC behaviour."""

    def __init__(self, settings: RegistrySettings, store: PlacementStore,
                 metrics: RegistryMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.fanout = Fanout(settings.watch_queue_size)
        hb = settings.effective_heartbeat_interval_s
        late = max(2 * hb + settings.status_write_interval_s, 1.0)
        self.view = ReplicaView(self.fanout, metrics, late)
        self.draining = False
        """True once shutdown began: streams end, health is no longer re-evaluated."""
        self.follower = StoreFollower(store, lambda: self._op("load", store.load()), self.view,
                                      self.fanout, metrics)
        self.reads = RegistryReads(settings, self.view, self.fanout, metrics)
        """Lookup, ListNodes, WatchNodes, WatchPlacement (from memory)."""
        metrics.track_index(lambda: self.view.index.entries,
                            self.view.index.entries_blocks,
                            self.view.index.approx_bytes,
                            lambda: len(self.view.nodes))

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect the store, load it, renew the leases it trusts, follow it in the background."""
        await self.store.start()
        await self.follower.start()
        await self._renew_trusted_leases()

    async def _renew_trusted_leases(self) -> None:
        """Renew, once, the lease of every loaded node no replica has heard from lately.

        The view trusts such a node for one TTL from the load, but its lease may have only
        moments left (no replica served its agent): without this, after an outage just under
        the lease life etcd expires it right after this replica serves the node, which then
        re-registers and resyncs from empty while routers see the fleet shrink and regrow. A
        lease found gone (etcd deletes its keys up to ~1 s late) is dropped before serving.
        """
        states = [s for s in self.view.nodes.values() if s.trusted_until_ms]
        gone: list[str] = []

        async def renew(state: LiveNode) -> None:
            with contextlib.suppress(Exception):  # best effort: its agent's heartbeat renews
                if await self._op("lease_keepalive", self.store.refresh_lease(state.record)) > 0:
                    state.lease_refreshed_mono = state.refreshed_here_mono = time.monotonic()
                else:
                    gone.append(state.node_id)
        for i in range(0, len(states), 64):
            await asyncio.gather(*(renew(s) for s in states[i:i + 64]))
        for node_id in gone:
            self.view.drop(node_id, expired=True)
        if states:
            log.info("renewed the leases of %d loaded node(s) until their agents reconnect; "
                     "%d had expired", len(states) - len(gone), len(gone))

    async def drain(self) -> None:
        """Shutdown step one: freeze health (a replica that stops hearing heartbeats because
        it stopped serving must not tell anyone the nodes turned unhealthy) and end every
        watch stream so its clients reconnect (to another replica) at once."""
        self.draining = True
        await self.follower.freeze_health()
        self.fanout.close_all()

    async def close(self) -> None:
        """Stop following and close the store."""
        await self.follower.stop()
        await self.store.close()

    async def _op(self, name: str, aw: Awaitable[T]) -> T:
        """Run one store operation with latency/error metrics and status mapping."""
        t0 = time.perf_counter()
        try:
            return await aw
        except StoreConflict:
            raise
        except (StoreUnavailable, Unavailable, TimeoutError) as exc:
            self.metrics.store_errors.labels(name).inc()
            raise Unavailable(f"etcd {name} failed: {exc}; the registry keeps serving lookups "
                              "from memory, retry this call") from exc
        except KvrouteError:
            self.metrics.store_errors.labels(name).inc()
            raise
        finally:
            self.metrics.store_seconds.labels(name).observe(time.perf_counter() - t0)

    # ---- writes ---------------------------------------------------------------------------
    async def _state(self, node_id: str) -> LiveNode:
        state = self.view.nodes.get(node_id)
        if state is None:
            rec = await self._op("get_node", self.store.get_node(node_id))
            if rec is not None:
                self.view.apply(NodePut(rec))
                state = self.view.nodes.get(node_id)
        if state is None:
            raise NotFound(f"node {node_id} is not registered (never, or its lease expired): "
                           "resync required: call RegisterNode, then Resync")
        return state

    async def register(self, req: pb.RegisterNodeRequest) -> Registration:
        """RegisterNode: a new lease, epoch and write token; the node starts with no blocks."""
        validate.register(req, self.settings)
        limits.check_capacity(self.settings, req.capacity_blocks, req.node_id)
        caller = CALLER.get()
        token, digest = limits.new_write_token()
        for _ in range(3):
            prev = await self._op("get_node", self.store.get_node(req.node_id))
            if prev is not None and prev.address != req.address:
                raise AlreadyExists(
                    f"node {req.node_id} is registered at {prev.address} with a live lease; "
                    f"a second node cannot take its id with address {req.address} (deregister "
                    f"it or wait up to {prev.lease_ttl_s}s for its lease to expire)")
            if prev is None and len(self.view.nodes) >= self.settings.max_nodes:
                raise ResourceExhausted(
                    f"{len(self.view.nodes)} nodes registered, the limit is "
                    f"{self.settings.max_nodes} (--max-nodes)")
            rec = NodeRecord(
                node_id=req.node_id, address=req.address, model=req.model,
                block_size=req.block_size, capacity_blocks=req.capacity_blocks,
                labels=dict(req.labels),
                epoch=max(prev.epoch + 1 if prev else 1, now_ms()), lease_id=0,
                lease_ttl_s=self.settings.lease_ttl_s, registered_unix_ms=now_ms(),
                token_sha256=digest, owner=f"{caller.role}:{caller.name}",
                role=req.role or "both")
            try:
                rec = await self._op("register", self.store.register_node(rec, prev))
            except StoreConflict:
                continue
            if prev is not None and prev.node_id in self.view.nodes:
                self.view.deregistered.add((prev.node_id, prev.epoch))
            self.view.apply(NodePut(rec))
            log.info("node %s registered at %s (epoch %d) by %s", rec.node_id, rec.address,
                     rec.epoch, caller)
            return Registration(rec, token)
        raise Unavailable(f"node {req.node_id} is being registered concurrently; retry")

    async def heartbeat(self, req: pb.HeartbeatRequest) -> HeartbeatResult:
        """Heartbeat: refresh the lease, record usage, apply the delta batch."""
        validate.heartbeat(req, self.settings)
        state = await self._state(req.node_id)
        if req.epoch != state.record.epoch:
            async with state.lock:
                return await self._heartbeat(state, req)
        # The node is alive even if etcd is not: it counts as heard from now, and stays
        # healthy while this heartbeat waits (for the node's lock, or on a stalled etcd).
        state.seen_unix_ms = now_ms()
        state.trusted_until_ms = 0
        state.beating += 1
        try:
            async with state.lock:
                return await self._heartbeat(state, req)
        finally:
            state.beating -= 1
            state.seen_unix_ms = max(state.seen_unix_ms, now_ms())

    async def _heartbeat(self, state: LiveNode, req: pb.HeartbeatRequest) -> HeartbeatResult:
        rec = state.record
        if req.epoch != rec.epoch:
            return self._resync("stale_epoch", rec, f"epoch {req.epoch} is stale, the "
                                f"node's current epoch is {rec.epoch}: RegisterNode again")
        limits.check_heartbeat(self.settings, self.metrics, self.view, state, req)
        state.seen_unix_ms = now_ms()
        mono = time.monotonic()
        since = mono - state.refreshed_here_mono
        if since >= rec.lease_ttl_s * REFRESH_SKIP_FRACTION:
            ttl = await self._op("lease_keepalive", self.store.refresh_lease(rec))
            if ttl <= 0:
                self.view.drop(rec.node_id, expired=True)
                raise NotFound(f"node {rec.node_id}: its lease expired; resync required: "
                               "call RegisterNode, then Resync")
            state.lease_refreshed_mono = state.refreshed_here_mono = time.monotonic()
        else:  # refreshed by this replica moments ago (a fast heartbeat burst)
            ttl = max(1, round(rec.lease_ttl_s - since))
        if validate.has_delta(req):
            result = await self._apply_delta(state, req)
            if result is not None:
                return result
        await self._status(state, req)
        self.metrics.heartbeats.labels("ok").inc()
        return HeartbeatResult(False, ttl)

    def _resync(self, reason: str, rec: NodeRecord, message: str) -> HeartbeatResult:
        self.metrics.resync_requests.labels(reason).inc()
        self.metrics.heartbeats.labels("resync_required").inc()
        return HeartbeatResult(True, rec.lease_ttl_s, message)

    async def _apply_delta(self, state: LiveNode, req: pb.HeartbeatRequest,
                           ) -> HeartbeatResult | None:
        seq = req.delta_seq
        if seq <= state.applied_seq:
            self.metrics.heartbeats.labels("duplicate").inc()
            return None  # a retry of a batch already applied: acknowledge only
        if seq != state.applied_seq + 1:
            return self._resync("seq_gap", state.record,
                                f"delta_seq {seq} skips ahead: the registry applied "
                                f"{state.applied_seq} last; send a full Resync")
        delta = Delta(seq=seq, base_gen=state.gen, cleared=req.cleared,
                      stored=as_hashes(req.stored), removed=as_hashes(req.removed),
                      stored_offloaded=as_hashes(req.stored_offloaded),
                      removed_offloaded=as_hashes(req.removed_offloaded))
        try:
            if delta.events * 8 > DELTA_KEY_MAX_BYTES:
                await self._large_delta(state, delta)
                return None
            await self._op("append_delta", self.store.append_delta(state.record, delta))
            if self.view.apply_delta(state, delta):
                self.metrics.block_events.inc(delta.events)
            if state.deltas_since_snapshot >= self.settings.snapshot_threshold:
                await self._snapshot(state, replace=False)
        except StoreConflict as exc:
            raise NotFound(f"node {state.node_id}: {exc}; resync required: RegisterNode, "
                           "then Resync") from exc
        return None

    async def _large_delta(self, state: LiveNode, delta: Delta) -> None:
        """A delta too big for one etcd value: persist the resulting set as a snapshot
        (chunked, <= 1 MiB per key) first, then apply the delta here."""
        after, after_off = self.view.after_delta(state, delta)
        gen = state.gen + 1
        await self._op("write_snapshot", self.store.write_snapshot(
            state.record, gen, delta.seq, after, False, after_off))
        if self.view.apply_delta(state, delta):
            self.metrics.block_events.inc(delta.events)
        self.view.apply_snapshot(state, SnapshotPut(state.node_id, state.record.epoch, gen,
                                                    delta.seq, False, after, after_off))

    async def _snapshot(self, state: LiveNode, replace: bool,
                        sets: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        hashes, offloaded = self.view.tier_sets(state) if sets is None else sets
        snap = SnapshotPut(state.node_id, state.record.epoch, state.gen + 1,
                           0 if replace else state.applied_seq, replace, hashes, offloaded)
        await self._op("write_snapshot", self.store.write_snapshot(
            state.record, snap.gen, snap.through_seq, hashes, replace, offloaded))
        self.view.apply_snapshot(state, snap)

    async def _status(self, state: LiveNode, req: pb.HeartbeatRequest) -> None:
        old = state.status
        t = now_ms()
        rate = old.eviction_rate
        if old.heartbeat_unix_ms and t > old.heartbeat_unix_ms:
            inst = max(0, req.evictions_total - old.evictions_total) * 1000.0 / (
                t - old.heartbeat_unix_ms)
            rate = 0.7 * rate + 0.3 * inst
        state.status = NodeStatus(
            used_blocks=req.used_blocks, evictions_total=req.evictions_total,
            queue_depth=req.queue_depth, running=req.running,
            capacity_blocks=req.capacity_blocks or old.capacity_blocks,
            eviction_rate=rate, heartbeat_unix_ms=t,
            engine_block_size=req.engine_block_size,
            engine_lookahead_tokens=req.engine_lookahead_tokens,
            index_state=int(req.index_state), index_note=req.index_note,
            prefill_tokens_per_s=req.prefill_tokens_per_s or old.prefill_tokens_per_s)
        self.view.fanout.publish(Change("upsert", state.node_id))
        mono = time.monotonic()
        if mono - state.status_written_mono >= self.settings.status_write_interval_s:
            state.status_written_mono = mono
            await self._op("put_status", self.store.put_status(state.record, state.status))

    async def resync(self, requests: AsyncIterator[pb.ResyncRequest]) -> int:
        """Resync: replace the node's whole block set with the streamed one."""
        node_id, epoch, used, total, total_off = "", 0, 0, 0, 0
        parts: list[np.ndarray] = []
        off_parts: list[np.ndarray] = []
        state: LiveNode | None = None
        async for req in requests:
            if state is None:
                node_id, epoch, used = validate.node_id(req.node_id), req.epoch, req.used_blocks
                state = await self._state(node_id)
                if epoch != state.record.epoch:
                    raise FailedPrecondition(
                        f"Resync for node {node_id} epoch {epoch}, but the current epoch is "
                        f"{state.record.epoch}: RegisterNode again first")
                limits.check_write_token(state.record, req.write_token, "Resync", self.metrics)
            elif (req.node_id, req.epoch) != (node_id, epoch):
                raise InvalidArgument(
                    "every Resync message must carry the same node_id and epoch")
            validate.hash_count(len(req.block_hashes), "block_hashes", self.settings)
            validate.hash_count(len(req.offloaded_block_hashes), "offloaded_block_hashes",
                                self.settings)
            total += len(req.block_hashes)
            total_off += len(req.offloaded_block_hashes)
            limits.check_resync_total(self.settings, self.metrics, self.view, state, total,
                                      total_off)
            parts.append(as_hashes(req.block_hashes))
            off_parts.append(as_hashes(req.offloaded_block_hashes))
        if state is None:
            raise InvalidArgument("empty Resync stream: send node_id and epoch")
        async with state.lock:
            if epoch != state.record.epoch:
                raise FailedPrecondition(
                    f"node {node_id} registered again during the Resync: RegisterNode and "
                    "resync again")
            hashes = np.unique(np.concatenate(parts)) if parts else as_hashes([])
            offloaded = np.unique(np.concatenate(off_parts)) if off_parts else as_hashes([])
            limits.check_resync_index(self.settings, self.metrics, self.view, state,
                                      int(hashes.size + offloaded.size))
            try:
                await self._snapshot(state, True, (hashes, offloaded))
            except StoreConflict as exc:
                raise NotFound(f"node {node_id}: {exc}; RegisterNode again") from exc
            state.status = NodeStatus(**{**state.status.__dict__, "used_blocks": used})
        self.metrics.resyncs.inc()
        return self.view.index.count(state.slot)

    async def deregister(self, req: pb.DeregisterNodeRequest) -> int:
        """DeregisterNode: delete the node's keys and lease; returns blocks dropped."""
        validate.node_id(req.node_id)
        state = await self._state(req.node_id)
        if req.epoch and req.epoch != state.record.epoch:
            raise FailedPrecondition(
                f"node {req.node_id} epoch {req.epoch} is not current ({state.record.epoch})")
        rec = state.record
        if CALLER.get().role != "admin":  # an operator drains any node without its token
            limits.check_write_token(rec, req.write_token, "DeregisterNode", self.metrics)
        self.view.deregistered.add((rec.node_id, rec.epoch))
        await self._op("delete_node", self.store.delete_node(rec))
        dropped = self.view.index.count(state.slot)
        self.view.apply(NodeGone(rec.node_id, rec.epoch))
        log.info("node %s deregistered (%d blocks dropped)", rec.node_id, dropped)
        return dropped
