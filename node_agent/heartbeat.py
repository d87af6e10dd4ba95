"""The agent's side of the registry protocol: register, heartbeat, resync, deregister.

Loop: connect (RegisterNode when needed, then Resync when needed) with tenacity retries
(exponential backoff with jitter, never giving up while running); then heartbeat every interval
or at once when woken (engine restart, a full delta batch). Any failed call sends the loop back
to connect, which re-sends the full set (a reconnect may have lost deltas). A heartbeat answered
with ``resync_required`` triggers a Resync; NOT_FOUND / FAILED_PRECONDITION on Heartbeat or
Resync (unknown node, stale epoch) triggers RegisterNode first. A refused RegisterNode
(FAILED_PRECONDITION: block size, hash scheme or model mismatch; INVALID_ARGUMENT) is fatal:
:class:`RegistrationRefused` propagates and the server exits with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_never,
    wait_exponential,
    wait_random,
)

from kvroute.blocks import HASH_SCHEME
from kvroute.grpcutil import message_size_options, open_channel
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


class RegistrationRefused(Exception):
    """The registry refused this node's configuration; retrying cannot help."""


class _Retry(Exception):
    """A transient failure: back off and reconnect."""


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


class RegistryLink:
    """Keeps the registry's view of one node in step with the agent's block map."""

    def __init__(self, settings: AgentSettings, blocks: BlockMap, deltas: DeltaLog,
                 usage: UsageProbe, health: IndexHealth | None = None) -> None:
        self._s = settings
        self._blocks = blocks
        self._deltas = deltas
        self._usage = usage
        self._health = health if health is not None else IndexHealth()
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_pb2_grpc.RegistryAsyncStub | None = None
        self._wake = asyncio.Event()
        self._need_register = True
        self._need_resync = False
        self._interval = settings.heartbeat_interval_s or 1.0
        self.stats = LinkStats()

    # --- triggers from the event side ---------------------------------------------------
    def request_resync(self, reason: str) -> None:
        """Send the full block set at the next opportunity (now)."""
        log.info("resync requested: %s", reason)
        self._need_resync = True
        self._wake.set()

    def wake(self) -> None:
        """Heartbeat now instead of at the next interval."""
        self._wake.set()

    # --- main loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled; raises RegistrationRefused when the registry refuses us."""
        self._channel = open_channel(self._s.registry, self._s.client_tls,
                                     message_size_options(64 << 20))
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        try:
            while True:
                async for attempt in AsyncRetrying(
                        retry=retry_if_exception_type(_Retry), stop=stop_never,
                        wait=wait_exponential(multiplier=0.2, max=10.0) + wait_random(0, 0.5),
                        before_sleep=self._log_retry, reraise=True):
                    with attempt:
                        await self._connect()
                self.stats.connected = True
                try:
                    await self._beat_loop()
                except _Retry:
                    self.stats.connected = False
                    self.stats.heartbeat_failures += 1
                    self._need_resync = True
        finally:
            self.stats.connected = False

    @staticmethod
    def _log_retry(state: object) -> None:
        outcome = getattr(state, "outcome", None)
        exc = outcome.exception() if outcome is not None else None
        wait = getattr(getattr(state, "next_action", None), "sleep", 0.0)
        log.warning("registry call failed (%s); retrying in %.1f s", exc, wait)

    async def _connect(self) -> None:
        for _ in range(2):  # an unknown node / stale epoch re-registers at once, no backoff
            registered = False
            try:
                if self._need_register:
                    await self._register()
                    registered = True
                if self._need_resync:
                    await self._resync()
                return
            except _Retry as exc:
                # RegisterNode itself failed (e.g. registry unreachable): report that error.
                if not self._need_register or not registered:
                    raise
                last = exc
        raise _Retry(f"the registry forgot the node again right after registering ({last})")

    def _rpc_error(self, exc: grpc.aio.AioRpcError, what: str) -> _Retry:
        if exc.code() in NEEDS_REGISTER_CODES:
            log.warning("%s: registry answered %s (%s): registering again", what,
                        exc.code().name, exc.details())
            self._need_register = True
        return _Retry(f"{what}: {exc.code().name}: {exc.details()}")

    async def _register(self) -> None:
        assert self._stub is not None
        s = self._s
        req = registry_pb2.RegisterNodeRequest(
            node_id=s.node_id, address=s.engine_url, model=s.model, block_size=s.block_size,
            capacity_blocks=self._usage.capacity_blocks or s.capacity_blocks,
            labels=s.label_map, hash_scheme=HASH_SCHEME)
        try:
            resp = await self._stub.RegisterNode(req, timeout=s.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in FATAL_REGISTER_CODES:
                raise RegistrationRefused(
                    f"registry {s.registry} refused node {s.node_id!r} "
                    f"(block_size {s.block_size}, model {s.model!r}, hash {HASH_SCHEME}): "
                    f"{exc.code().name}: {exc.details()}") from exc
            raise _Retry(f"RegisterNode: {exc.code().name}: {exc.details()}") from exc
        if resp.block_size and resp.block_size != s.block_size:
            raise RegistrationRefused(
                f"registry block size is {resp.block_size} but this agent hashes "
                f"{s.block_size}-token blocks: set --block-size {resp.block_size}")
        self.stats.registrations += 1
        self.stats.epoch = resp.epoch
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
                                         offloaded_block_hashes=offloaded[:n])
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
            removed_offloaded=batch.removed_offloaded)
        size = req.ByteSize()
        self.stats.last_heartbeat_bytes = size
        self.stats.max_heartbeat_bytes = max(self.stats.max_heartbeat_bytes, size)
        try:
            resp = await self._stub.Heartbeat(req, timeout=self._s.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
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
        if self._stub is None or not self.stats.epoch:
            return
        try:
            await self._stub.DeregisterNode(
                registry_pb2.DeregisterNodeRequest(node_id=self._s.node_id,
                                                   epoch=self.stats.epoch), timeout=timeout_s)
            log.info("deregistered node %s", self._s.node_id)
        except grpc.aio.AioRpcError as exc:
            log.warning("DeregisterNode failed: %s %s", exc.code().name, exc.details())
