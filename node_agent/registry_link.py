"""The agent's side of the registry protocol: register, heartbeat, resync, deregister.

Loop: wait until the engine is healthy; connect (RegisterNode when needed, then Resync when
needed, then one heartbeat that proves the link) with tenacity retries (exponential back-off
capped at ``--registry-retry-max-s``, jittered, never giving up while running; gRPC's own
reconnect back-off is capped the same, so a registry that comes back is used within about that
long); then heartbeat every interval or at once when woken (engine restart, a full delta
batch). A failed heartbeat is retried with the same ``delta_seq`` (the registry acknowledges a
repeat without re-applying it), so a short outage costs no resync. A connectivity failure moves
to the next registry address when several are configured. A heartbeat answered with
``resync_required`` triggers a Resync; NOT_FOUND / FAILED_PRECONDITION on Heartbeat or Resync
(unknown node, stale epoch) triggers RegisterNode first. A refused RegisterNode
(FAILED_PRECONDITION: block size, hash scheme or model mismatch; INVALID_ARGUMENT) is fatal:
:class:`RegistrationRefused` propagates and the server exits with a clear message.

Engine liveness is part of the node's health: when the engine stops answering its health
check (:mod:`node_agent.engine_health`), :meth:`RegistryLink.engine_down` deregisters the node
(it leaves routing at once) and the link waits; :meth:`RegistryLink.engine_up` registers it
again with the block set the agent holds then (a dead engine's blocks are cleared first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from tenacity import RetryCallState

from kvroute.blocks import HASH_SCHEME
from kvroute.grpcutil import message_size_options, open_channel, reconnect_options
from kvroute.retry import retrying
from kvroute.targets import TargetRing
from kvroute.v1 import registry_pb2, registry_pb2_grpc
from node_agent.block_map import BlockMap
from node_agent.deltas import DeltaBatch, DeltaLog
from node_agent.events import IndexHealth
from node_agent.settings import AgentSettings
from node_agent.usage import UsageProbe

log = logging.getLogger(__name__)

FATAL_REGISTER_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.UNIMPLEMENTED)
NEEDS_REGISTER_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
CONNECTIVITY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.CANCELLED)
"""Failures that say "this registry address is not answering": try the next address."""


class RegistrationRefused(Exception):
    """The registry refused this node's configuration; retrying cannot help."""


class _Retry(Exception):
    """A transient failure: back off and reconnect."""

    def __init__(self, message: str, connectivity: bool = False) -> None:
        super().__init__(message)
        self.connectivity = connectivity


class _EngineDown(Exception):
    """The engine stopped answering its health check: leave routing until it is back."""


@dataclass
class LinkStats:
    """Counters of the registry link (exported as metrics)."""

    registrations: int = 0
    heartbeats: int = 0
    heartbeat_failures: int = 0
    resyncs: int = 0
    resync_blocks: int = 0
    last_heartbeat_bytes: int = 0
    max_heartbeat_bytes: int = 0
    connected: bool = False
    epoch: int = 0
    engine_up: bool = True
    engine_downs: int = 0
    registry_switches: int = 0


class RegistryLink:
    """Keeps the registry's view of one node in step with the agent's block map."""

    def __init__(self, settings: AgentSettings, blocks: BlockMap, deltas: DeltaLog,
                 usage: UsageProbe, health: IndexHealth | None = None) -> None:
        self._s = settings
        self._blocks = blocks
        self._deltas = deltas
        self._usage = usage
        self._ring = TargetRing(settings.registry)
        self._health = health if health is not None else IndexHealth()
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_pb2_grpc.RegistryAsyncStub | None = None
        self._switch = False
        self._engine_ok = asyncio.Event()
        self._engine_ok.set()
        self._wake = asyncio.Event()
        self._need_register = True
        self._need_resync = False
        self._interval = settings.heartbeat_interval_s or 1.0
        self._write_token = ""
        """RegisterNodeResponse.write_token: authorises our writes (kept in memory only)."""
        self.stats = LinkStats()

    # --- triggers from the event side ---------------------------------------------------
    def request_resync(self, reason: str) -> None:
        """Send the full block set at the next opportunity (now)."""
        log.info("resync requested: %s", reason)
        self._need_resync = True
        self._wake.set()

    @property
    def interval_s(self) -> float:
        """Heartbeat interval in use (the registry's suggestion unless configured)."""
        return self._interval

    def wake(self) -> None:
        """Heartbeat now instead of at the next interval."""
        self._wake.set()

    def await_engine(self) -> None:
        """Do not register until :meth:`engine_up` (the engine's first good health check)."""
        self._engine_ok.clear()
        self.stats.engine_up = False

    def engine_down(self, why: str) -> None:
        """The engine is not serving: stop heartbeating and leave routing (deregister)."""
        if self._engine_ok.is_set():
            log.warning("engine down (%s): node %s leaves routing until it is back", why,
                        self._s.node_id)
            self._engine_ok.clear()
            self.stats.engine_up = False
            self.stats.engine_downs += 1
            self._wake.set()

    def engine_up(self) -> None:
        """The engine serves again: register (and resync) the node."""
        if not self._engine_ok.is_set():
            log.info("engine healthy again: registering node %s", self._s.node_id)
            self.stats.engine_up = True
            self._engine_ok.set()

    # --- main loop ----------------------------------------------------------------------
    def _open(self) -> None:
        s = self._s
        self._channel = open_channel(
            self._ring.current, s.client_tls,
            [*message_size_options(64 << 20), *reconnect_options(s.registry_retry_max_s)])
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    async def _next_registry(self) -> None:
        """Use the next registry address (after a connectivity failure)."""
        self._switch = False
        if len(self._ring) < 2:
            return
        old = self._ring.current
        self._ring.advance()
        self.stats.registry_switches += 1
        log.warning("registry %s is not answering; switching to %s", old, self._ring.current)
        if self._channel is not None:
            await self._channel.close(None)
        self._open()

    async def run(self) -> None:
        """Run until cancelled; raises RegistrationRefused when the registry refuses us."""
        self._open()
        try:
            while True:
                if not self._engine_ok.is_set():
                    await self._leave()
                    await self._engine_ok.wait()
                # never wait longer than a heartbeat interval between attempts: a registry
                # that is slow (stalled etcd) but alive keeps hearing from the node
                cap = max(0.05, min(self._s.registry_retry_max_s, self._interval) - 0.05)
                async for attempt in retrying(_Retry, first_s=0.1, max_s=cap, jitter="added",
                                              before_sleep=self._log_retry):
                    with attempt:
                        await self._connect()
                if not self._engine_ok.is_set():
                    continue
                if not self.stats.connected:
                    log.info("registry link up (%s)", self._ring.describe())
                self.stats.connected = True
                try:
                    await self._beat_loop()
                except _Retry as exc:
                    self.stats.connected = False
                    self.stats.heartbeat_failures += 1
                    log.warning("registry link lost: %s", exc)
                    # no forced Resync: the unacknowledged batch is re-sent with its delta_seq
                except _EngineDown:
                    pass
        finally:
            self.stats.connected = False

    async def _leave(self) -> None:
        """Deregister while the engine is down; register again when it is back."""
        self.stats.connected = False
        if not self._need_register:
            await self.deregister(min(2.0, self._s.rpc_timeout_s))
        self._need_register = True

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        self.stats.connected = False
        log.warning("registry %s: %s; retrying in %.1f s", self._ring.current, exc, wait)

    async def _connect(self) -> None:
        """Register/resync when needed, then one heartbeat; raises _Retry on failure."""
        if self._switch:
            await self._next_registry()
        if not self._engine_ok.is_set():
            return
        try:
            for attempt in range(2):
                if self._need_register:
                    await self._register()  # a failure here goes to the back-off as it is
                try:
                    if self._need_resync:
                        await self._resync()
                    await self._heartbeat()
                    return
                except _Retry:
                    # the registry did not know the node / its epoch (NOT_FOUND,
                    # FAILED_PRECONDITION): register again at once, once
                    if not self._need_register or attempt == 1:
                        raise
        except _Retry as exc:
            self._switch = exc.connectivity
            raise

    def _rpc_error(self, exc: grpc.aio.AioRpcError, what: str) -> _Retry:
        if exc.code() in NEEDS_REGISTER_CODES:
            log.warning("%s: registry answered %s (%s): registering again", what,
                        exc.code().name, exc.details())
            self._need_register = True
        return _Retry(f"{what}: {exc.code().name}: {exc.details()}",
                      connectivity=exc.code() in CONNECTIVITY_CODES)

    async def _register(self) -> None:
        assert self._stub is not None
        s = self._s
        req = registry_pb2.RegisterNodeRequest(
            node_id=s.node_id, address=s.engine_url, model=s.model, block_size=s.block_size,
            capacity_blocks=self._usage.capacity_blocks or s.capacity_blocks,
            labels=s.label_map, hash_scheme=HASH_SCHEME, role=s.role)
        try:
            resp = await self._stub.RegisterNode(req, timeout=s.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in FATAL_REGISTER_CODES:
                raise RegistrationRefused(
                    f"registry {s.registry} refused node {s.node_id!r} "
                    f"(block_size {s.block_size}, model {s.model!r}, hash {HASH_SCHEME}): "
                    f"{exc.code().name}: {exc.details()}") from exc
            raise _Retry(f"RegisterNode: {exc.code().name}: {exc.details()}",
                         connectivity=exc.code() in CONNECTIVITY_CODES) from exc
        if resp.block_size and resp.block_size != s.block_size:
            raise RegistrationRefused(
                f"registry block size is {resp.block_size} but this agent hashes "
                f"{s.block_size}-token blocks: set --block-size {resp.block_size}")
        self.stats.registrations += 1
        self.stats.epoch = resp.epoch
        self._write_token = resp.write_token
        self._interval = s.heartbeat_interval_s or resp.heartbeat_interval_s or 1.0
        self._need_register = False
        # A fresh registration holds no blocks: send ours (even none) and number from 1.
        self._need_resync = True
        log.info("registered node %s epoch %d (lease %d s, heartbeat every %.2f s)",
                 s.node_id, resp.epoch, resp.lease_ttl_s, self._interval)

    async def _resync_messages(self, hashes: list[int], used: int, offloaded: list[int],
                               ) -> AsyncIterator[registry_pb2.ResyncRequest]:
        n = self._s.resync_batch
        epoch = self.stats.epoch
        yield registry_pb2.ResyncRequest(node_id=self._s.node_id, epoch=epoch,
                                         block_hashes=hashes[:n], used_blocks=used,
                                         offloaded_block_hashes=offloaded[:n],
                                         write_token=self._write_token)
        for i in range(n, max(len(hashes), len(offloaded)), n):
            yield registry_pb2.ResyncRequest(node_id=self._s.node_id, epoch=epoch,
                                             block_hashes=hashes[i:i + n],
                                             offloaded_block_hashes=offloaded[i:i + n])

    async def _resync(self) -> None:
        assert self._stub is not None
        # Snapshot and reset in one step (no await between): later events become seq 1...
        hashes = self._blocks.canonical_hashes()
        offloaded = self._blocks.offloaded_hashes()
        self._deltas.reset(1)
        self._need_resync = False
        try:
            resp = await self._stub.Resync(self._resync_messages(hashes, len(hashes), offloaded),
                                           timeout=self._s.rpc_timeout_s + len(hashes) / 1e5)
        except grpc.aio.AioRpcError as exc:
            self._need_resync = True
            raise self._rpc_error(exc, "Resync") from exc
        # Changes made while the stream ran stay pending and go out as the next seq.
        self._deltas.renumber(resp.next_delta_seq or 1)
        self.stats.resyncs += 1
        self.stats.resync_blocks = len(hashes)
        log.info("resync: sent %d blocks, registry indexed %d", len(hashes),
                 resp.blocks_indexed)

    async def _beat_loop(self) -> None:
        while True:
            if not self._engine_ok.is_set():
                raise _EngineDown()
            if self._need_register or self._need_resync:
                await self._connect()
            await self._heartbeat()
            if self._deltas.has_pending() and (self._deltas.pending_count()
                                               >= self._s.max_delta_hashes):
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()

    async def _heartbeat(self) -> None:
        assert self._stub is not None
        batch: DeltaBatch = self._deltas.take()
        usage = await self._usage.read()
        req = registry_pb2.HeartbeatRequest(
            node_id=self._s.node_id, epoch=self.stats.epoch, used_blocks=usage.used_blocks,
            evictions_total=self._blocks.evictions_total, queue_depth=usage.queue_depth,
            running=usage.running, prefill_tokens_per_s=usage.prefill_tokens_per_s,
            stored=batch.stored, removed=batch.removed,
            cleared=batch.cleared, delta_seq=batch.seq,
            engine_block_size=self._blocks.engine_block_size,
            engine_lookahead_tokens=self._blocks.lookahead_tokens,
            index_state=registry_pb2.IndexState.ValueType(int(self._health.state)),
            index_note=self._health.note, stored_offloaded=batch.stored_offloaded,
            removed_offloaded=batch.removed_offloaded, write_token=self._write_token)
        size = req.ByteSize()
        self.stats.last_heartbeat_bytes = size
        self.stats.max_heartbeat_bytes = max(self.stats.max_heartbeat_bytes, size)
        try:
            resp = await self._stub.Heartbeat(req, timeout=self._s.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._switch = exc.code() in CONNECTIVITY_CODES
            raise self._rpc_error(exc, "Heartbeat") from exc
        self.stats.heartbeats += 1
        if resp.resync_required:
            log.warning("registry asks for a resync: %s", resp.reason or "(no reason given)")
            self._need_resync = True
            return
        self._deltas.ack(batch)

    async def close(self) -> None:
        """Close the channel (after :meth:`deregister`)."""
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
            self._stub = None

    async def deregister(self, timeout_s: float = 3.0) -> None:
        """Leave routing at once (graceful shutdown); errors are logged, not raised."""
        if self._stub is None or not self.stats.epoch or self._need_register:
            return
        try:
            await self._stub.DeregisterNode(
                registry_pb2.DeregisterNodeRequest(node_id=self._s.node_id,
                                                   epoch=self.stats.epoch,
                                                   write_token=self._write_token),
                timeout=timeout_s)
            log.info("deregistered node %s", self._s.node_id)
        except grpc.aio.AioRpcError as exc:
            log.warning("DeregisterNode failed: %s %s", exc.code().name, exc.details())
