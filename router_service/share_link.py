"""The replica's end of ``RouteShare.Exchange`` on the registry (issue 19).

:class:`ShareLink` keeps one bidirectional stream to the registry: it sends this replica's
:class:`~router_service.route_share.RouteDelta` batches (queued by
:meth:`SharedView.routed <router_service.route_share.SharedView.routed>` without blocking the
decision) and applies every other replica's deltas to the routing core
(:meth:`RouterCore.apply_remote <router_service.core.RouterCore.apply_remote>`). Link up: the
shared view is live (its remote part starts empty); link down or silent for the view's
``timeout_s``: the core decides on its own counts and says so, and the link reconnects with
jittered back-off. Deltas published while the link is down are dropped (bounded queue).

On every (re)connect the link first sends a snapshot of this replica's own requests in flight
(at most ``max_snapshot``, newest kept, in batches of :data:`MAX_BATCH`), ahead of any later
delta, so the others rebuild its contribution after the hub made them forget it; it sends
another when the hub asks (``resend_snapshot``: a relay link came up, or another router
joined) or when its queue overflowed (a snapshot supersedes the deltas dropped). It applies the
others' snapshots (:meth:`SharedView.apply_snapshot
<router_service.route_share.SharedView.apply_snapshot>`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import grpc

from kvroute.aio import cancel_and_wait
from kvroute.grpcutil import open_channel
from kvroute.settings import TLSSettings
from kvroute.v1 import route_share_pb2 as pb
from kvroute.v1 import route_share_pb2_grpc as pb_grpc
from router_service.core import RouterCore
from router_service.metrics import RouterMetrics
from router_service.retry import LinkNeverUp, reconnect_options, reconnect_retrying
from router_service.route_share import RouteDelta, SharedView

log = logging.getLogger(__name__)

MAX_BATCH = 1000
"""Deltas per message sent."""

_Item = RouteDelta | pb.RouteShareMessage
"""Queued: one of this replica's deltas, or a snapshot part ready to send."""


class ShareLink:
    """One replica's Exchange stream: send own deltas, apply the others'."""

    def __init__(self, target: str, tls: TLSSettings | None = None, *,
                 retry_max_s: float = 2.0, max_queue: int = 100_000,
                 max_snapshot: int = 100_000) -> None:
        if max_queue < 1 or max_snapshot < 0:
            raise ValueError("max_queue must be >= 1 and max_snapshot >= 0")
        self._target = target
        self._tls = tls
        self._retry_max_s = retry_max_s
        self._max_queue = max_queue
        self._max_snapshot = max_snapshot
        self._queue: deque[_Item] = deque()
        self._snapshot_queued = False
        """A snapshot waits in the queue (a resend request adds no second one)."""
        self._metrics: RouterMetrics | None = None
        self._wake = asyncio.Event()
        self._gen = 0
        """Connection number: only the current stream's request generator sends."""
        self._up = False
        self._core: RouterCore | None = None
        self._view: SharedView | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent_total = 0
        self.received_total = 0
        self.dropped_total = 0
        """Own deltas not sent (link down, or the queue overflowed)."""

    def send(self, delta: RouteDelta) -> None:
        """Queue one of this replica's deltas (the SharedView's publish function)."""
        if not self._up:
            self.dropped_total += 1
            return
        if len(self._queue) >= self._max_queue:
            # the registry does not keep up: drop the backlog and send a snapshot instead (it
            # already holds this delta's effect: the core counts before it publishes)
            self.dropped_total += sum(isinstance(d, RouteDelta) for d in self._queue) + 1
            log.warning("route share: %d deltas queued for the registry, the limit; sending a "
                        "snapshot of the requests in flight instead", len(self._queue))
            self._queue.clear()
            self._snapshot_queued = False
            self._queue_snapshot("queue overflow")
            return
        self._queue.append(delta)
        self._wake.set()

    def attach(self, core: RouterCore, metrics: RouterMetrics | None = None) -> None:
        """The core whose shared view this link feeds (``core.share`` must be set)."""
        if core.share is None:
            raise ValueError("the core has no shared view to feed")
        self._core, self._view, self._metrics = core, core.share, metrics

    def _queue_snapshot(self, why: str) -> None:
        """Queue a snapshot of this replica's requests in flight behind what is queued (the
        deltas before it carry the old epoch, those after it the new one)."""
        core, view = self._core, self._view
        assert core is not None and view is not None
        if self._snapshot_queued:
            return
        epoch, deltas = view.snapshot(core.tracker, self._max_snapshot)
        parts = [deltas[i:i + MAX_BATCH] for i in range(0, len(deltas), MAX_BATCH)] or [[]]
        for i, part in enumerate(parts):
            self._queue.append(pb.RouteShareMessage(
                deltas=[_to_msg(d) for d in part],
                snapshot=pb.RouteSnapshot(epoch=epoch, first=i == 0, last=i == len(parts) - 1)))
        self._snapshot_queued = True
        self._wake.set()
        if self._metrics is not None:
            self._metrics.shared_view_snapshots.labels("sent").inc()
        log.info("route share: snapshot of %d requests in flight queued (epoch %d, %s)",
                 len(deltas), epoch, why)

    async def start(self) -> None:
        """Connect in the background (returns at once)."""
        if self._core is None:
            raise RuntimeError("attach(core) before start()")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="route-share-link")

    async def stop(self) -> None:
        """Close the stream."""
        task, self._task = self._task, None
        try:
            await cancel_and_wait(task)
        finally:  # also when the caller is cancelled while waiting
            self._set_up(False, "router stopping")

    def _apply_snapshot(self, msg: pb.RouteShareMessage) -> None:
        view = self._view
        assert view is not None
        snap = msg.snapshot
        applied_before = view.snapshots_applied
        n = view.apply_snapshot(snap.replica_id, snap.epoch, snap.first,
                                [_from_msg(d) for d in msg.deltas])
        m = self._metrics
        if m is not None:
            m.shared_view_restored.inc(n)
            if view.snapshots_applied > applied_before:
                m.shared_view_snapshots.labels("applied").inc()

    def _set_up(self, up: bool, why: str = "") -> None:
        self._up = up
        if not up:
            self._queue.clear()
            self._snapshot_queued = False
        if self._view is not None:
            self._view.set_connected(up, why)

    async def _run(self) -> None:
        while True:
            try:
                async for attempt in reconnect_retrying(self._retry_max_s):
                    with attempt:
                        await self._once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in delta handling must not stop the link
                log.exception("route share link failed; reconnecting")
                self._set_up(False, "link failed")
                await asyncio.sleep(self._retry_max_s)

    async def _outgoing(self, replica_id: str, epoch: int,
                        gen: int) -> AsyncIterator[pb.RouteShareMessage]:
        yield pb.RouteShareMessage(hello=pb.RouteShareHello(replica_id=replica_id, epoch=epoch))
        q = self._queue
        while True:
            await self._wake.wait()
            if gen != self._gen:  # a dead stream's request poller: leave the queue alone
                return
            self._wake.clear()
            while q:
                if isinstance(q[0], pb.RouteShareMessage):  # a snapshot part
                    part = q.popleft()
                    assert isinstance(part, pb.RouteShareMessage)
                    if part.snapshot.last:
                        self._snapshot_queued = False
                    part.sent_unix_us = time.time_ns() // 1000
                    yield part
                    continue
                batch: list[pb.RouteDeltaMsg] = []
                while q and len(batch) < MAX_BATCH and isinstance(q[0], RouteDelta):
                    d = q.popleft()
                    assert isinstance(d, RouteDelta)
                    batch.append(_to_msg(d))
                self.sent_total += len(batch)
                yield pb.RouteShareMessage(deltas=batch, sent_unix_us=time.time_ns() // 1000)

    async def _once(self) -> None:
        core, view = self._core, self._view
        assert core is not None and view is not None
        channel = open_channel(self._target, self._tls, reconnect_options(self._retry_max_s))
        was_up = False
        try:
            call = pb_grpc.RouteShareStub(channel).Exchange(
                self._outgoing(view.replica_id, view.next_epoch(), self._gen))
            async for msg in call:
                if not was_up:
                    was_up = True
                    self._set_up(True)
                    log.info("route share: connected as %s", view.replica_id)
                    self._queue_snapshot("connected")
                elif not view.live():
                    # the view went stale while this stream stayed open (nothing heard for
                    # --share-timeout-s: a stalled event loop here or at the hub) and dropped
                    # the others' state; only a new stream's snapshots rebuild it, and until
                    # one the replica would decide on its own counts for as long as the
                    # stream lasts: end it, _run reconnects at once
                    log.warning("route share: %s while the stream stayed open; reconnecting "
                                "to rebuild the shared view", view.why_not)
                    return
                elif msg.resend_snapshot:
                    self._queue_snapshot("the registry asked")
                view.heard()  # liveness; each delta's staleness is measured as it is applied
                if msg.forget_replicas:
                    dropped = view.forget(msg.forget_replicas, msg.forget_epochs)
                    if dropped:
                        log.info("route share: dropped %d in-flight requests of %s (their "
                                 "path to this router broke)", dropped,
                                 ", ".join(msg.forget_replicas[:5]))
                self.received_total += len(msg.deltas)
                if msg.HasField("snapshot"):
                    self._apply_snapshot(msg)
                    continue
                for d in msg.deltas:
                    core.apply_remote(_from_msg(d))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # stop(): grpc says CANCELLED, not
                raise asyncio.CancelledError from None  # CancelledError (else retried)
            why = f"{exc.code().name}: {exc.details()}"
            self._set_up(False, f"registry stream ended ({why})")
            if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT):
                log.warning("route share: %s; retrying", why)
            if was_up:
                return
            raise
        finally:
            if self._up:
                self._set_up(False, "registry stream ended")
            # grpc keeps iterating a finished call's request generator (its poller task is
            # cancelled only by cancel() before the call ends): retire it, or it would take
            # the next stream's first batch off the shared queue and lose it
            self._gen += 1
            self._wake.set()
            await channel.close(None)
        if not was_up:
            raise LinkNeverUp("route share stream ended before it was up")


def _to_msg(d: RouteDelta) -> pb.RouteDeltaMsg:
    return pb.RouteDeltaMsg(
        request_id=d.request_id, node_id=d.node_id, uncached_tokens=d.uncached_tokens,
        cached_tokens=d.cached_tokens, block_hashes=d.block_hashes,
        sent_unix_us=int(d.sent_at * 1e6), completed=d.completed, epoch=d.epoch)


def _from_msg(d: pb.RouteDeltaMsg) -> RouteDelta:
    return RouteDelta(d.replica_id, d.request_id, d.node_id, d.uncached_tokens,
                      d.cached_tokens, tuple(d.block_hashes), d.sent_unix_us / 1e6,
                      d.completed, d.epoch)
