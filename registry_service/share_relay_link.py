"""One registry hub's relay link to one peer hub (issue 19; see
:mod:`registry_service.share_relay`).

The link dials the peer's advertised address and opens ``RouteShare.Exchange`` with
``hello.relay``; it sends this hub's own replicas' deltas (and forgets) and a keepalive when
idle, and reads only the peer's keepalives. The peer must answer with the hub id the directory
named (an address that reaches another hub, e.g. a Service in front of several pods, would
double-deliver: refused and logged). Silence for ``share_relay_timeout_s`` or a broken stream:
reconnect with jittered back-off (:func:`kvroute.retry.retrying`); deltas published while the
link is down are dropped and counted (the peer forgot this hub's replicas when the stream ended).
Each time the link comes up it calls ``on_up``: the hub asks its routers for a fresh snapshot of
their requests in flight, which reaches the peer through the link and rebuilds what it forgot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from kvroute.aio import cancel_and_wait
from kvroute.grpcutil import open_channel, reconnect_options
from kvroute.retry import retrying
from kvroute.settings import TLSSettings
from kvroute.v1 import route_share_pb2 as pb
from kvroute.v1 import route_share_pb2_grpc as pb_grpc
from registry_service.store.hubs import HubRecord

log = logging.getLogger(__name__)
REMIND_EVERY_S = 30.0
"""While a link keeps failing, a reminder in the log at most this often."""


class RelayBroken(Exception):
    """The relay stream ended or went silent (reconnect)."""


class RelayMetrics:
    """The relay's metrics (registered whether or not the relay runs: off, they read 0 and
    the ``KvrouteShareGroupsSplit`` alert sees a split)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.links: Callable[[], Collection[RelayLink]] = tuple
        """The relay's links (set by the relay once it runs)."""
        self.relayed_out = Counter(
            "kvroute_registry_route_share_relayed_out_total",
            "Deltas of this hub's routers sent to peer hubs (one per peer)", registry=registry)
        self.dropped = Counter(
            "kvroute_registry_route_share_relay_dropped_total",
            "Deltas of this hub's routers not relayed to a peer hub (its link was down or too "
            "far behind)", registry=registry)
        self.failures = Counter(
            "kvroute_registry_route_share_relay_failures_total",
            "Relay links to peer hubs that failed to connect or broke", registry=registry)
        peers = Gauge("kvroute_registry_route_share_relay_peers",
                      "Other registry hubs in the hub directory (etcd)", registry=registry)
        peers.set_function(lambda: float(len(self.links())))
        up = Gauge("kvroute_registry_route_share_relay_links",
                   "Relay links to peer hubs that are up (every router hears every other when "
                   "each registry replica has one to each other replica)", registry=registry)
        up.set_function(lambda: float(sum(1 for link in self.links() if link.up)))


class RelayLink:
    """The relay stream from this hub to one peer hub."""

    def __init__(self, own: HubRecord, peer: HubRecord, tls: TLSSettings,
                 counters: RelayMetrics, *, timeout_s: float, retry_max_s: float,
                 max_queued: int, on_up: Callable[[], None] | None = None) -> None:
        self.own = own
        self.peer = peer
        self._tls = tls
        self._counters = counters
        self._timeout_s = timeout_s
        self._retry_max_s = retry_max_s
        self._max_queued = max_queued
        self._on_up = on_up
        self._queue: deque[pb.RouteShareMessage] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._gen = 0
        """Connection number: only the current stream's request generator sends."""
        self.up = False
        self._failures = 0
        self._last_log = float("-inf")
        self._task: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        return f"hub {self.peer.hub_id} ({self.peer.replica_id} at {self.peer.address})"

    def send(self, msg: pb.RouteShareMessage) -> None:
        """Queue a message of this hub's own replicas for the peer (never blocks)."""
        n = len(msg.deltas)
        if not self.up or self._queued + n > self._max_queued:
            self._counters.dropped.inc(n)
            return
        self._queue.append(msg)
        self._queued += n
        self._wake.set()

    def start(self) -> None:
        """Connect in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"share-relay-{self.peer.hub_id}")

    async def stop(self) -> None:
        """Close the stream. A caller cancelled while waiting here (the relay's directory
        follower during shutdown) is cancelled: :func:`kvroute.aio.cancel_and_wait` lets the
        caller's own cancellation through."""
        task, self._task = self._task, None
        try:
            await cancel_and_wait(task)
        finally:
            self._set_up(False)

    def _set_up(self, up: bool) -> None:
        self.up = up
        if not up:
            self._queue.clear()
            self._queued = 0

    def _failed(self, exc: BaseException) -> None:
        self._counters.failures.inc()
        self._failures += 1
        now = time.monotonic()
        if self._failures > 1 and now - self._last_log < REMIND_EVERY_S:
            return
        self._last_log = now
        what = (f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError)
                else str(exc) or type(exc).__name__)
        hint = ""
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            hint = (" (the relay needs a registry:<name> or admin identity on the peer: "
                    "--share-relay-token-file or a client certificate, see --share-relay-*)")
        log.warning("route share relay to %s down (%d failed attempt%s): %s%s; routers there do "
                    "not hear this registry's routers until it is back; retrying", self,
                    self._failures, "" if self._failures == 1 else "s", what, hint)

    async def _run(self) -> None:
        def before_sleep(state: object) -> None:
            outcome = getattr(state, "outcome", None)
            exc = outcome.exception() if outcome is not None else None
            if exc is not None:
                self._failed(exc)
        async for attempt in retrying(Exception, first_s=0.05, max_s=self._retry_max_s,
                                      before_sleep=before_sleep):
            with attempt:
                await self._once()

    async def _outgoing(self, gen: int) -> AsyncIterator[pb.RouteShareMessage]:
        yield pb.RouteShareMessage(hello=pb.RouteShareHello(
            replica_id=self.own.replica_id, relay=True, hub_id=self.own.hub_id,
            to_hub_id=self.peer.hub_id))
        keepalive = min(1.0, self._timeout_s / 3)
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), keepalive)
            except TimeoutError:
                if gen != self._gen:
                    return
                yield pb.RouteShareMessage(sent_unix_us=time.time_ns() // 1000)
                continue
            if gen != self._gen:  # a dead stream's request poller: leave the queue alone
                return
            self._wake.clear()
            while self._queue:
                msg = self._queue.popleft()
                self._queued -= len(msg.deltas)
                self._counters.relayed_out.inc(len(msg.deltas))
                yield msg

    async def _once(self) -> None:
        channel = open_channel(self.peer.address, self._tls,
                               reconnect_options(self._retry_max_s))
        try:
            call = pb_grpc.RouteShareStub(channel).Exchange(self._outgoing(self._gen))
            it = aiter(call)
            first = await asyncio.wait_for(anext(it), self._timeout_s)
            if first.hub_id != self.peer.hub_id:
                raise RelayBroken(
                    f"{self.peer.address} answered as hub {first.hub_id or '(unnamed)'}, not "
                    f"{self.peer.hub_id}: --share-relay-advertise must be each registry "
                    "replica's own address (the pod IP), never a Service; or that replica "
                    "restarted and its old record has not expired yet")
            self._set_up(True)
            log.info("route share relay to %s up%s", self,
                     f" after {self._failures} failed attempts" if self._failures else "")
            self._failures = 0
            if self._on_up is not None:
                self._on_up()
            while True:
                await asyncio.wait_for(anext(it), self._timeout_s)
        except StopAsyncIteration:
            raise RelayBroken("the peer ended the relay stream") from None
        except TimeoutError:
            raise RelayBroken(f"nothing heard for {self._timeout_s:g} s") from None
        finally:
            self._set_up(False)
            # grpc keeps iterating a finished call's request generator: retire it
            self._gen += 1
            self._wake.set()
            await channel.close(None)
