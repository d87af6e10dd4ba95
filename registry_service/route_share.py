"""``RouteShare.Exchange``: the registry merges router replicas' routing deltas (issue 19).

Every router (or gateway) replica keeps one bidirectional stream open. Its first message is a
``hello`` naming the replica; after that it sends batches of :class:`RouteDeltaMsg` (routed,
completed) and receives every *other* replica's batches, stamped with the sender's replica id, plus
a keepalive (an empty message with the registry's clock) every ``keepalive_s``. The hub keeps no
routing state: it only fans out, so a registry restart costs the replicas their shared view until
they reconnect (each then falls back to its own counts, and says so).

A subscriber that cannot keep up (its queue of ``max_queued`` batches is full) loses its stream
with RESOURCE_EXHAUSTED instead of silently missing deltas (a missed completion would count a
request in flight until its timeout); it reconnects with an empty remote view. Bad input ends the
sender's stream with INVALID_ARGUMENT and a message naming the field.

Known limit: with several registry replicas, routers connected to different registry replicas
form separate sharing groups (the hubs do not relay to one another).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from kvroute.settings import require, setting
from kvroute.v1 import route_share_pb2 as pb
from kvroute.v1 import route_share_pb2_grpc as pb_grpc

MAX_ID = 256


@dataclass(frozen=True)
class RouteShareSettings:
    """Limits of the hub (defaults fit hundreds of replicas x thousands of decisions/s)."""

    keepalive_s: float = setting(1.0, "seconds between keepalives to each replica")
    max_queued: int = setting(
        10_000, "batches queued per replica before its stream is ended (it is too slow)")
    max_deltas: int = setting(10_000, "deltas accepted in one message")
    max_blocks: int = setting(256, "block hashes accepted per delta")

    def __post_init__(self) -> None:
        require(self.keepalive_s > 0, "keepalive_s", "must be > 0")
        for name in ("max_queued", "max_deltas", "max_blocks"):
            require(getattr(self, name) >= 1, name, "must be >= 1")


class _Sub:
    __slots__ = ("error", "queue", "replica_id")

    def __init__(self, replica_id: str, size: int) -> None:
        self.replica_id = replica_id
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
    """Fans every replica's deltas out to every other connected replica."""

    def __init__(self, settings: RouteShareSettings | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings or RouteShareSettings()
        self._subs: set[_Sub] = set()
        self.replicas = Gauge("kvroute_registry_route_share_replicas",
                              "Router replicas connected to RouteShare.Exchange",
                              registry=registry)
        self.replicas.set_function(lambda: float(len(self._subs)))
        self.deltas = Counter("kvroute_registry_route_share_deltas_total",
                              "Routing deltas received from router replicas", registry=registry)
        self.dropped = Counter(
            "kvroute_registry_route_share_slow_replicas_total",
            "Replica streams ended because the replica did not keep up", registry=registry)

    def _check(self, msg: pb.RouteShareMessage) -> str:
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
        return ""

    async def _read(self, requests: AsyncIterator[pb.RouteShareMessage], sub: _Sub) -> None:
        try:
            async for msg in requests:
                why = self._check(msg)
                if why:
                    sub.close(grpc.StatusCode.INVALID_ARGUMENT, why)
                    return
                if not msg.deltas:
                    continue
                for d in msg.deltas:
                    d.replica_id = sub.replica_id
                self.deltas.inc(len(msg.deltas))
                out = pb.RouteShareMessage(deltas=msg.deltas, sent_unix_us=_now_us())
                for other in list(self._subs):
                    if other is sub or other.error is not None:
                        continue
                    try:
                        other.queue.put_nowait(out)
                    except asyncio.QueueFull:
                        self.dropped.inc()
                        other.close(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"replica {other.replica_id} fell more than "
                                    f"{self.settings.max_queued} batches behind; reconnect")
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        sub.close()

    async def Exchange(self, request_iterator: AsyncIterator[pb.RouteShareMessage],
                       context: grpc.aio.ServicerContext[pb.RouteShareMessage,
                                                         pb.RouteShareMessage],
                       ) -> AsyncIterator[pb.RouteShareMessage]:
        """See the module docstring."""
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        rid = first.hello.replica_id
        if not 1 <= len(rid) <= MAX_ID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"hello.replica_id: the first message must name the replica "
                                f"(1-{MAX_ID} characters); got {len(rid)} characters")
        sub = _Sub(rid, self.settings.max_queued)
        self._subs.add(sub)
        reader = asyncio.create_task(self._read(request_iterator, sub))
        try:
            yield pb.RouteShareMessage(sent_unix_us=_now_us())  # connected
            while True:
                try:
                    msg = await asyncio.wait_for(sub.queue.get(), self.settings.keepalive_s)
                except TimeoutError:
                    msg = pb.RouteShareMessage(sent_unix_us=_now_us())
                if msg is None:
                    break
                yield msg
            if sub.error is not None:
                await context.abort(*sub.error)
        finally:
            self._subs.discard(sub)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
