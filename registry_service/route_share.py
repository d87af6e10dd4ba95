"""``RouteShare.Exchange``: the registry merges router replicas' routing deltas (issue 19).

Every router (or gateway) replica keeps one bidirectional stream open. Its first message is a
``hello`` naming the replica; after that it sends batches of :class:`RouteDeltaMsg` (routed,
completed) and receives every *other* replica's batches, stamped with the sender's replica id, plus
a keepalive (an empty message with the registry's clock) every ``keepalive_s``. The hub keeps no
routing state: it only fans out, so a registry restart costs the replicas their shared view until
they reconnect (each then falls back to its own counts, and says so).

Several registry replicas: each hub also hands its own replicas' deltas to :attr:`relay_out`
(:class:`registry_service.share_relay.ShareRelay` sends them to every peer hub), and accepts
relay streams from peer hubs (``hello.relay``): their deltas keep their origin replica id and go
to this hub's replicas only, never to another hub, so there are no loops and no duplicates, and a
replica never gets its own deltas back. When a path to a replica breaks (its stream here ends, or
the relay stream from its hub does), the hub tells everyone who can no longer hear its
completions to drop its in-flight requests (``forget_replicas``, with the newest epoch heard
from each on that path) instead of counting them until their timeout.

Nothing is lost by a forget: every replica sends a snapshot of its own requests in flight on each
(re)connect (``snapshot``), which the others put in place of what they hold for it. The hub
stamps it with the replica's id and fans it out (and relays it) like deltas. It asks its routers
for a fresh one (``resend_snapshot``) when one of its relay links to a peer hub comes up (the
peer forgot them when the link broke) and when a router joins anywhere (it starts with an empty
view of the others); joins within :data:`RESEND_DELAY_S` share one request.

A subscriber that cannot keep up (its queue of ``max_queued`` batches is full) loses its stream
with RESOURCE_EXHAUSTED instead of silently missing deltas (a missed completion would count a
request in flight until its timeout); it reconnects with an empty remote view. Bad input ends the
sender's stream with INVALID_ARGUMENT and a message naming the field.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from kvroute.aio import cancel_and_wait
from kvroute.settings import require, setting
from kvroute.v1 import route_share_pb2 as pb
from kvroute.v1 import route_share_pb2_grpc as pb_grpc
from registry_service.auth import CALLER

log = logging.getLogger(__name__)
MAX_ID = 256
MAX_ORIGINS = 100_000
"""Distinct replicas one relay stream may speak for."""
RELAY_ROLES = ("registry", "admin", "anonymous")
"""Identities that may join as a relay hub (anonymous: --auth none)."""
RESEND_DELAY_S = 0.2
"""Routers joining within this long share one ``resend_snapshot`` request to the others."""


@dataclass(frozen=True)
class RouteShareSettings:
    """Limits of the hub (defaults fit hundreds of replicas x thousands of decisions/s)."""

    keepalive_s: float = setting(1.0, "seconds between keepalives to each replica")
    max_queued: int = setting(
        10_000, "batches queued per replica before its stream is ended (it is too slow)")
    max_deltas: int = setting(10_000, "deltas accepted in one message")
    max_blocks: int = setting(256, "block hashes accepted per delta")
    relay_timeout_s: float = setting(
        5.0, "an inbound relay stream silent (no keepalive) for this long is dropped")

    def __post_init__(self) -> None:
        require(self.keepalive_s > 0, "keepalive_s", "must be > 0")
        require(self.relay_timeout_s > 0, "relay_timeout_s", "must be > 0")
        for name in ("max_queued", "max_deltas", "max_blocks"):
            require(getattr(self, name) >= 1, name, "must be >= 1")


class _Sub:
    __slots__ = ("epoch", "error", "hub_id", "origins", "queue", "replaced", "replica_id")

    def __init__(self, replica_id: str, size: int, hub_id: str = "", epoch: int = 0) -> None:
        self.replica_id = replica_id
        self.hub_id = hub_id
        """Set for an inbound relay stream: the peer hub's instance id."""
        self.epoch = epoch
        """A router's stream: the newest epoch it gave (hello, deltas, snapshots)."""
        self.origins: dict[str, int] = {}
        """Replicas a relay stream spoke for, with the newest epoch of each (forgotten when it
        ends)."""
        self.replaced = False
        self.queue: asyncio.Queue[pb.RouteShareMessage | None] = asyncio.Queue(size)
        self.error: tuple[grpc.StatusCode, str] | None = None

    def close(self, code: grpc.StatusCode | None = None, message: str = "") -> None:
        if code is not None and self.error is None:
            self.error = (code, message)
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


def _now_us() -> int:
    return time.time_ns() // 1000


class RouteShareHub(pb_grpc.RouteShareServicer):
    """Fans every replica's deltas out to every other replica, here and through peer hubs."""

    def __init__(self, settings: RouteShareSettings | None = None,
                 registry: CollectorRegistry | None = None, hub_id: str = "") -> None:
        self.settings = settings or RouteShareSettings()
        self.hub_id = hub_id or uuid.uuid4().hex
        """This hub's instance id (new on every start)."""
        self.relay_out: Callable[[pb.RouteShareMessage], None] | None = None
        """Where this hub's own replicas' deltas and forgets go to reach the peer hubs."""
        self._subs: set[_Sub] = set()
        self._relays: dict[str, _Sub] = {}
        self._resend: asyncio.TimerHandle | None = None
        self.replicas = Gauge("kvroute_registry_route_share_replicas",
                              "Router replicas connected to RouteShare.Exchange",
                              registry=registry)
        self.replicas.set_function(lambda: float(len(self._subs)))
        self.deltas = Counter("kvroute_registry_route_share_deltas_total",
                              "Routing deltas received from router replicas", registry=registry)
        self.dropped = Counter(
            "kvroute_registry_route_share_slow_replicas_total",
            "Replica streams ended because the replica did not keep up", registry=registry)
        self.relays_in = Gauge(
            "kvroute_registry_route_share_relay_inbound",
            "Peer registry hubs relaying their routers' deltas to this one", registry=registry)
        self.relays_in.set_function(lambda: float(len(self._relays)))
        self.relayed_in = Counter(
            "kvroute_registry_route_share_relayed_in_total",
            "Deltas received from peer hubs and delivered to this hub's routers",
            registry=registry)
        self.snapshots = Counter(
            "kvroute_registry_route_share_snapshots_total",
            "Snapshots of a router's requests in flight fanned out to this hub's routers (its "
            "own routers' and peer hubs' relayed ones)", registry=registry)
        self.resends = Counter(
            "kvroute_registry_route_share_resend_requests_total",
            "Times this hub asked its routers for a fresh snapshot (a relay link came up, or "
            "a router joined)", registry=registry)

    def _check(self, msg: pb.RouteShareMessage, relay: bool) -> str:
        s = self.settings
        if len(msg.deltas) > s.max_deltas:
            return f"deltas: {len(msg.deltas)} in one message, the limit is {s.max_deltas}"
        for i, d in enumerate(msg.deltas):
            if not 1 <= len(d.request_id) <= MAX_ID:
                return f"deltas[{i}].request_id: must be 1-{MAX_ID} characters"
            if not d.completed and not 1 <= len(d.node_id) <= MAX_ID:
                return f"deltas[{i}].node_id: required (1-{MAX_ID} characters) unless completed"
            if len(d.block_hashes) > s.max_blocks:
                return (f"deltas[{i}].block_hashes: {len(d.block_hashes)}, the limit is "
                        f"{s.max_blocks} (send a bounded prefix)")
            if relay and not 1 <= len(d.replica_id) <= MAX_ID:
                return f"deltas[{i}].replica_id: a relay must name the origin replica"
        if any(not 1 <= len(r) <= MAX_ID for r in msg.forget_replicas):
            return f"forget_replicas: each must be 1-{MAX_ID} characters"
        if len(msg.forget_epochs) > len(msg.forget_replicas):
            return "forget_epochs: at most one per forget_replicas entry"
        if msg.HasField("snapshot"):
            snap = msg.snapshot
            if snap.epoch < 1:
                return "snapshot.epoch: required (>= 1, the sender's epoch at the snapshot)"
            if any(d.completed for d in msg.deltas):
                return "snapshot: lists requests in flight; a completed delta cannot be in it"
            if relay and not 1 <= len(snap.replica_id) <= MAX_ID:
                return "snapshot.replica_id: a relay must name the origin replica"
            if relay and any(d.replica_id != snap.replica_id for d in msg.deltas):
                return "snapshot: every delta must be of snapshot.replica_id"
        return ""

    def _deliver(self, msg: pb.RouteShareMessage, skip: _Sub | None = None) -> None:
        """Queue ``msg`` for every replica here but ``skip``, leaving out each replica's own
        deltas (a replica that moved hubs may still have some relayed)."""
        origins = {d.replica_id for d in msg.deltas}
        if msg.HasField("snapshot"):
            origins.add(msg.snapshot.replica_id)
        for other in list(self._subs):
            if other is skip or other.error is not None:
                continue
            out = msg
            if other.replica_id in origins:
                out = pb.RouteShareMessage(
                    deltas=[d for d in msg.deltas if d.replica_id != other.replica_id],
                    forget_replicas=msg.forget_replicas, forget_epochs=msg.forget_epochs,
                    sent_unix_us=msg.sent_unix_us)
                if msg.HasField("snapshot") and msg.snapshot.replica_id != other.replica_id:
                    out.snapshot.CopyFrom(msg.snapshot)
                if not (out.deltas or out.forget_replicas or out.HasField("snapshot")):
                    continue
            try:
                other.queue.put_nowait(out)
            except asyncio.QueueFull:
                self.dropped.inc()
                other.close(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"replica {other.replica_id} fell more than "
                            f"{self.settings.max_queued} batches behind; reconnect")

    def _forget(self, replicas: dict[str, int], relay: bool) -> None:
        """Tell this hub's replicas (and, for its own replica, the peer hubs) to drop the
        in-flight requests of ``replicas`` (replica -> newest epoch heard on the broken path):
        their completions can no longer reach them."""
        if not replicas:
            return
        rids = sorted(replicas)
        msg = pb.RouteShareMessage(forget_replicas=rids,
                                   forget_epochs=[replicas[r] for r in rids],
                                   sent_unix_us=_now_us())
        self._deliver(msg)
        if relay and self.relay_out is not None:
            self.relay_out(msg)

    def request_snapshots(self, why: str, relay: bool = False) -> None:
        """Ask every router here for a fresh snapshot of its requests in flight (and, with
        ``relay``, every peer hub's routers too: a router joined and knows nobody's yet)."""
        msg = pb.RouteShareMessage(resend_snapshot=True, sent_unix_us=_now_us())
        if self._subs:
            self.resends.inc()
            log.info("route share: asking %d routers for a snapshot of their requests in "
                     "flight (%s)", len(self._subs), why)
            self._deliver(msg)
        if relay and self.relay_out is not None:
            self.relay_out(msg)

    def _joined(self) -> None:
        """A router joined: ask the others (here and at every peer hub) to re-announce their
        requests in flight, once for every join within :data:`RESEND_DELAY_S`."""
        if self._resend is not None:
            return

        def fire() -> None:
            self._resend = None
            self.request_snapshots("a router joined", relay=True)
        self._resend = asyncio.get_running_loop().call_later(RESEND_DELAY_S, fire)

    async def _read(self, requests: AsyncIterator[pb.RouteShareMessage], sub: _Sub) -> None:
        relay = bool(sub.hub_id)
        try:
            it = aiter(requests)
            while True:
                if relay:  # the peer sends keepalives: silence means it is gone
                    msg = await asyncio.wait_for(anext(it), self.settings.relay_timeout_s)
                else:
                    msg = await anext(it)
                why = self._check(msg, relay)
                if why:
                    sub.close(grpc.StatusCode.INVALID_ARGUMENT, why)
                    return
                if relay:
                    self._relayed(msg, sub)
                    continue
                snap = msg.snapshot if msg.HasField("snapshot") else None
                if not msg.deltas and snap is None:
                    continue
                for d in msg.deltas:
                    d.replica_id = sub.replica_id
                    d.origin_hub = self.hub_id
                    sub.epoch = max(sub.epoch, d.epoch)
                self.deltas.inc(len(msg.deltas))
                out = pb.RouteShareMessage(deltas=msg.deltas, sent_unix_us=_now_us())
                if snap is not None:
                    snap.replica_id = sub.replica_id
                    sub.epoch = max(sub.epoch, snap.epoch)
                    out.snapshot.CopyFrom(snap)
                    if snap.first:
                        self.snapshots.inc()
                self._deliver(out, skip=sub)
                if self.relay_out is not None:
                    self.relay_out(out)
        except StopAsyncIteration:
            pass
        except TimeoutError:
            log.warning("route share: relay from hub %s (%s) silent for over %.1fs; dropping "
                        "it (its routers' in-flight requests are forgotten here)", sub.hub_id,
                        sub.replica_id, self.settings.relay_timeout_s)
            sub.close(grpc.StatusCode.DEADLINE_EXCEEDED, "relay silent: no keepalive")
            return
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        sub.close()

    def _relayed(self, msg: pb.RouteShareMessage, sub: _Sub) -> None:
        origins = sub.origins
        for rid in msg.forget_replicas:
            origins.pop(rid, None)
        for d in msg.deltas:
            origins[d.replica_id] = max(origins.get(d.replica_id, 0), d.epoch)
        snap = msg.snapshot if msg.HasField("snapshot") else None
        if snap is not None:
            origins[snap.replica_id] = max(origins.get(snap.replica_id, 0), snap.epoch)
        if len(origins) > MAX_ORIGINS:
            sub.close(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"a relay may speak for at most {MAX_ORIGINS} replicas")
            return
        if msg.resend_snapshot:  # a router joined at the peer hub
            self.request_snapshots(f"a router joined at hub {sub.hub_id}")
        # a replica that moved to this hub is alive here: its old hub's forget is stale
        local = {s.replica_id for s in self._subs}
        epochs = list(msg.forget_epochs)
        keep = [i for i, r in enumerate(msg.forget_replicas) if r not in local]
        if not (msg.deltas or keep or snap is not None):
            return
        self.relayed_in.inc(len(msg.deltas))
        out = pb.RouteShareMessage(
            deltas=msg.deltas, forget_replicas=[msg.forget_replicas[i] for i in keep],
            forget_epochs=[epochs[i] if i < len(epochs) else 0 for i in keep],
            sent_unix_us=_now_us())
        if snap is not None:
            out.snapshot.CopyFrom(snap)
            if snap.first:
                self.snapshots.inc()
        self._deliver(out)

    async def _open(self, hello: pb.RouteShareHello,
                    context: grpc.aio.ServicerContext[pb.RouteShareMessage,
                                                      pb.RouteShareMessage]) -> _Sub:
        rid = hello.replica_id
        if not 1 <= len(rid) <= MAX_ID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"hello.replica_id: the first message must name the replica "
                                f"(1-{MAX_ID} characters); got {len(rid)} characters")
        if not hello.relay:
            sub = _Sub(rid, self.settings.max_queued, epoch=hello.epoch)
            self._subs.add(sub)
            self._joined()
            return sub
        caller = CALLER.get()
        if caller.role not in RELAY_ROLES:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"relay hello refused: caller is {caller}; a relay hub needs a "
                                "registry:<name> or admin identity (routers join without "
                                "hello.relay)")
        if not 1 <= len(hello.hub_id) <= MAX_ID or hello.hub_id == self.hub_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"hello.hub_id: a relay names its own hub (1-{MAX_ID} "
                                f"characters, not this hub's id {self.hub_id}): got "
                                f"{hello.hub_id!r}")
        if hello.to_hub_id != self.hub_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"hello.to_hub_id: this is hub {self.hub_id}, not "
                                f"{hello.to_hub_id!r} (a stale directory record, or an advertised "
                                "address that reaches several registry pods)")
        sub = _Sub(rid, 64, hub_id=hello.hub_id)
        old = self._relays.get(hello.hub_id)
        if old is not None:  # the peer reconnected before its old stream was noticed dead
            old.replaced = True
            old.close(grpc.StatusCode.ABORTED, "replaced by a newer relay stream")
            self._forget(old.origins, relay=False)
        self._relays[hello.hub_id] = sub
        log.info("route share: hub %s (%s) relays its routers' deltas here", hello.hub_id, rid)
        return sub

    def _close(self, sub: _Sub) -> None:
        if not sub.hub_id:
            if sub in self._subs:
                self._subs.discard(sub)
                # a replica that reconnected before its old stream was noticed dead is still
                # here: its requests still reach everyone
                if all(s.replica_id != sub.replica_id for s in self._subs):
                    self._forget({sub.replica_id: sub.epoch}, relay=True)
            return
        if self._relays.get(sub.hub_id) is sub:
            del self._relays[sub.hub_id]
        if not sub.replaced:
            log.info("route share: relay from hub %s (%s) ended; forgetting the in-flight "
                     "requests of its %d routers here", sub.hub_id, sub.replica_id,
                     len(sub.origins))
            self._forget(sub.origins, relay=False)

    async def Exchange(self, request_iterator: AsyncIterator[pb.RouteShareMessage],
                       context: grpc.aio.ServicerContext[pb.RouteShareMessage,
                                                         pb.RouteShareMessage],
                       ) -> AsyncIterator[pb.RouteShareMessage]:
        """See the module docstring."""
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        sub = await self._open(first.hello, context)
        reader = asyncio.create_task(self._read(request_iterator, sub))
        try:
            yield pb.RouteShareMessage(sent_unix_us=_now_us(), hub_id=self.hub_id)  # connected
            while True:
                try:
                    msg = await asyncio.wait_for(sub.queue.get(), self.settings.keepalive_s)
                except TimeoutError:
                    msg = pb.RouteShareMessage(sent_unix_us=_now_us(), hub_id=self.hub_id)
                if msg is None:
                    break
                yield msg
            if sub.error is not None:
                await context.abort(*sub.error)
        finally:
            self._close(sub)
            await cancel_and_wait(reader)
