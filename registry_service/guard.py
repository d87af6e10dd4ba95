"""The registry's gRPC server interceptor: authenticate, authorise, rate-limit every call.

Read methods (Lookup, LookupStream, ListNodes, Watch*) are checked once per call (a stream
once, not per message). Write methods (RegisterNode, Heartbeat, Resync, DeregisterNode) are
checked before their message is decoded: the interceptor swaps in a raw-bytes deserializer, so
a caller over its per-client write limit or without the right identity costs the registry the
bytes it received, never a protobuf decode of a 1M-hash message. Once admitted, the message
is decoded, its ``node_id`` is checked against the caller's identity (an agent writes only its
own node), and the caller's identity is put in :data:`registry_service.auth.CALLER` for the
core (which stores the registering identity with the node).

Health and reflection are never checked (Kubernetes probes carry no credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from kvroute.errors import KvrouteError, PermissionDenied, ResourceExhausted, Unauthenticated
from kvroute.v1 import registry_pb2, route_share_pb2
from registry_service.auth import CALLER, READ_METHODS, WRITE_METHODS, Authenticator, Identity
from registry_service.metrics import RegistryMetrics
from registry_service.peek import node_id_of
from registry_service.security_settings import SecuritySettings
from registry_service.trim import MemoryTrimmer

SERVICE_PREFIX = "/" + registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name + "/"
SHARE_EXCHANGE = ("/" + route_share_pb2.DESCRIPTOR.services_by_name["RouteShare"].full_name
                  + "/Exchange")
"""Router replicas' shared view (issue 19): readers may join it, like the reads they make."""
SMALL_MESSAGE_BYTES = 64 * 1024
"""Write messages this small are counted against the byte budget but never refused by it."""
RESYNC_BYTES_PER_HASH = 11
"""Wire bytes per hash of a Resync (varint of a 64-bit hash, packed): sizes the byte burst."""
MAX_TRACKED_CLIENTS = 10_000
"""Per-client buckets kept; the least recently used are forgotten beyond this."""

_Ctx = grpc.aio.ServicerContext[Any, Any]
_Refusal: TypeAlias = tuple[grpc.StatusCode, str, float]
MAX_TARPIT_S = 1.0
"""Longest a rate-limited call is held before its refusal is sent."""
MAX_REFUSED_HOLD_S = 3.0
"""Longest a large refused write is held before its refusal is sent (under the 5 s or longer
deadlines agents and most clients give a write)."""
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


@dataclass
class _Bucket:
    calls: float
    nbytes: float
    at: float


class ClientLimiter:
    """Token buckets per client: write calls per second (with a burst) and bytes per second.

    A client is an identity (``--auth required``) or, with ``--auth none``, a connection and
    the node it writes: several agents in one process share a connection (gRPC pools them).

    The bytes bucket holds ``bytes_burst`` (room for a full Resync of the largest node) and
    refills at ``bytes_per_s``. It may go into debt: a message is admitted while the client is
    not in debt, whatever its size, and the client then waits the debt off. Messages of at
    most ``SMALL_MESSAGE_BYTES`` are counted but never refused, so a lease-refreshing heartbeat
    always gets through right after a large Resync.
    """

    def __init__(self, calls_per_s: float, burst: int, bytes_per_s: int,
                 bytes_burst: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.calls_per_s, self.burst, self.bytes_per_s = calls_per_s, burst, bytes_per_s
        self.bytes_burst = max(bytes_per_s, bytes_burst)
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, client: str) -> _Bucket:
        now = self._clock()
        b = self._buckets.get(client)
        if b is None:
            b = _Bucket(float(self.burst), float(self.bytes_burst), now)
            self._buckets[client] = b
            if len(self._buckets) > MAX_TRACKED_CLIENTS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
            dt = now - b.at
            b.calls = min(float(self.burst), b.calls + dt * self.calls_per_s)
            b.nbytes = min(float(self.bytes_burst), b.nbytes + dt * self.bytes_per_s)
            b.at = now
        return b

    def call(self, client: str, method: str) -> None:
        """Take one write call; RESOURCE_EXHAUSTED when the client has none left."""
        b = self._bucket(client)
        if b.calls < 1.0:
            wait = (1.0 - b.calls) / self.calls_per_s
            raise RateLimited(wait,
                f"{method} refused: client {client} is over its write limit of "
                f"{self.calls_per_s:g} calls/s (burst {self.burst}, --client-write-calls-per-s);"
                f" retry in {wait:.2f}s")
        b.calls -= 1.0

    def payload(self, client: str, method: str, nbytes: int) -> None:
        """Take ``nbytes``; RESOURCE_EXHAUSTED while the client is in byte debt."""
        b = self._bucket(client)
        if b.nbytes <= 0 and nbytes > SMALL_MESSAGE_BYTES:
            wait = -b.nbytes / self.bytes_per_s
            raise RateLimited(wait,
                f"{method} refused: client {client} sent more than its write limit of "
                f"{self.bytes_per_s} bytes/s (--client-write-bytes-per-s); retry in {wait:.2f}s")
        b.nbytes -= nbytes


@dataclass
class _Admitted:
    ident: Identity
    client: str
    request: list[Any]
    """The decoded request (unary calls), in a list so the caller can pop it."""


class RateLimited(ResourceExhausted):
    """A client over its write limit; ``retry_after_s`` until it has budget again."""

    def __init__(self, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


async def _no_precheck(method: str, raw: bytes) -> None:
    return None


def _reason(exc: KvrouteError) -> str:
    if isinstance(exc, Unauthenticated):
        return "unauthenticated"
    if isinstance(exc, PermissionDenied):
        return "permission_denied"
    if isinstance(exc, RateLimited):
        return "rate_limited"
    return "precheck"


class RegistryGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authentication, authorisation and per-client write limits for ``kvroute.v1.Registry``."""

    def __init__(self, settings: SecuritySettings, metrics: RegistryMetrics,
                 trimmer: MemoryTrimmer | None = None,
                 precheck: Callable[[str, bytes], Awaitable[None]] | None = None) -> None:
        self.auth = Authenticator(settings)
        self.metrics = metrics
        self.precheck = precheck or _no_precheck
        """Refuses a write from its raw bytes before decoding (registry_service.limits)."""
        self.trimmer = trimmer or MemoryTrimmer(0)
        self.limiter = ClientLimiter(
            settings.client_write_calls_per_s, settings.client_write_burst,
            settings.client_write_bytes_per_s,
            bytes_burst=RESYNC_BYTES_PER_HASH * settings.max_blocks_per_node)
        self.refused_bytes_per_s = settings.client_refused_bytes_per_s
        self._jitter = random.Random()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[_Handler]],
            handler_call_details: grpc.HandlerCallDetails) -> _Handler:
        handler = await continuation(handler_call_details)
        full: str = handler_call_details.method
        if handler is not None and full == SHARE_EXCHANGE and self.auth.required:
            return self._read_generator("Exchange", handler)
        if handler is None or not full.startswith(SERVICE_PREFIX):
            return handler
        method = full[len(SERVICE_PREFIX):]
        if method in WRITE_METHODS:
            return self._write(method, handler)
        if method in READ_METHODS and self.auth.required:
            return self._read(method, handler)
        return handler

    # ---- checks ---------------------------------------------------------------------------
    def _identify(self, ctx: _Ctx, method: str) -> Identity:
        metadata = {k: v for k, v in (ctx.invocation_metadata() or ())
                    if isinstance(v, str)}
        ident = self.auth.identify(metadata, ctx.auth_context() if self.auth.required else {})
        self.auth.authorize(ident, method)
        return ident

    @staticmethod
    def _client(ident: Identity, ctx: _Ctx, raw: bytes | None = None) -> str:
        """The rate-limit key: the identity; with --auth none, the connection and the node
        written (agents of several nodes may share one process and one connection)."""
        if ident.role != "anonymous":
            return f"{ident.role}:{ident.name}"
        node = node_id_of(raw) if raw is not None else ""
        return f"{ctx.peer()}/{node}" if node else ctx.peer()

    def _refusal(self, method: str, exc: KvrouteError) -> _Refusal:
        """Count a refusal; the status to abort with *after* leaving the ``except`` block
        (aborting inside it keeps the exception, its traceback and the frame's locals, e.g.
        a 10 MB message, alive in a reference cycle until a full garbage collection)."""
        reason = _reason(exc)
        if reason != "precheck":  # the precheck counts its own refusals (node_capacity)
            self.metrics.refused.labels(method, reason).inc()
        delay = min(exc.retry_after_s, MAX_TARPIT_S) if isinstance(exc, RateLimited) else 0.0
        return exc.code, exc.message, delay

    @staticmethod
    async def _abort(ctx: _Ctx, refusal: _Refusal) -> None:
        """Abort with the refusal's status; a rate-limited caller is answered only once it
        has budget again (at most MAX_TARPIT_S), so a client sending one call after another
        is paced to its limit instead of making the registry receive refused messages at
        wire speed."""
        code, message, delay = refusal
        if delay > 0:
            await asyncio.sleep(delay)
        await ctx.abort(code, message)

    # ---- handler wrappers -----------------------------------------------------------------
    def _check_read(self, ctx: _Ctx, method: str) -> _Refusal | None:
        try:
            CALLER.set(self._identify(ctx, method))  # RouteShare checks who may relay
        except KvrouteError as exc:
            return self._refusal(method, exc)
        return None

    def _read(self, method: str, handler: _Handler) -> _Handler:
        h: Any = handler
        if h.unary_unary is not None:
            inner_uu = h.unary_unary

            async def uu(request: Any, ctx: _Ctx) -> Any:
                refused = self._check_read(ctx, method)
                if refused is not None:
                    await self._abort(ctx, refused)
                return await inner_uu(request, ctx)
            return h._replace(unary_unary=uu)  # type: ignore[no-any-return]
        if h.unary_stream is not None:
            inner_us = h.unary_stream

            async def us(request: Any, ctx: _Ctx) -> AsyncIterator[Any]:
                refused = self._check_read(ctx, method)
                if refused is not None:
                    await self._abort(ctx, refused)
                async for item in inner_us(request, ctx):
                    yield item
            return h._replace(unary_stream=us)  # type: ignore[no-any-return]
        inner_ss = h.stream_stream  # LookupStream reads with context.read(): keep its decoder

        async def ss(request_iterator: Any, ctx: _Ctx) -> Any:
            refused = self._check_read(ctx, method)
            if refused is not None:
                await self._abort(ctx, refused)
            return await inner_ss(request_iterator, ctx)
        return h._replace(stream_stream=ss)  # type: ignore[no-any-return]

    def _read_generator(self, method: str, handler: _Handler) -> _Handler:
        """:meth:`_read` for a bidirectional stream served by an async generator
        (``RouteShare.Exchange``)."""
        h: Any = handler
        inner = h.stream_stream

        async def ss(request_iterator: Any, ctx: _Ctx) -> AsyncIterator[Any]:
            refused = self._check_read(ctx, method)
            if refused is not None:
                # take the client's hello first: aborting a bidirectional stream while the
                # client is still writing its first message sometimes reached the client as
                # INTERNAL ("Internal error from Core") instead of the refusal
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(anext(aiter(request_iterator), None), 1.0)
                await self._abort(ctx, refused)
            async for item in inner(request_iterator, ctx):
                yield item
        return h._replace(stream_stream=ss)  # type: ignore[no-any-return]

    async def _admit(self, ctx: _Ctx, method: str, raw: bytes | None,
                     decode: Callable[[bytes], Any],
                     ) -> _Admitted | _Refusal:
        """Identify, rate-limit and (for a unary call) decode and authorise the message."""
        try:
            ident = self._identify(ctx, method)
            client = self._client(ident, ctx, raw)
            self.limiter.call(client, method)
            request = None
            if raw is not None:
                self.trimmer.note(len(raw))
                self.limiter.payload(client, method, len(raw))
                await self.precheck(method, raw)
                request = decode(raw)
                self.auth.authorize(ident, method, request.node_id)
            return _Admitted(ident, client, [request])
        except KvrouteError as exc:
            code, message, delay = self._refusal(method, exc)
        if raw is not None and len(raw) > SMALL_MESSAGE_BYTES and not delay:
            # a large message refused here before it is decoded (over a block limit, for an
            # unknown node, not authorised) is answered only after the time its bytes take at
            # the refused-bytes rate (refusals after decoding, in the core, are not held): gRPC
            # copies each message into Python on the event loop before any check can run
            # (~4 ms of loop time per 3 MB), so a client sending writes that cannot succeed
            # one after another makes the registry copy at most that many bytes per second
            # (jittered after the cap: clients refused at once must not all come back at once)
            delay = (min(MAX_REFUSED_HOLD_S, len(raw) / self.refused_bytes_per_s)
                     * self._jitter.uniform(0.8, 1.0))
        return code, message, delay

    def _write(self, method: str, handler: _Handler) -> _Handler:
        h: Any = handler
        decode: Callable[[bytes], Any] = h.request_deserializer

        if h.unary_unary is not None:
            inner_uu = h.unary_unary

            async def uu(raw: bytes, ctx: _Ctx) -> Any:
                admitted = await self._admit(ctx, method, raw, decode)
                del raw
                if not isinstance(admitted, _Admitted):
                    await self._abort(ctx, admitted)
                    raise AssertionError("unreachable: abort raises")
                ident = admitted.ident
                # No local of this frame keeps the (maybe 10 MB) request: if the call is
                # aborted, gRPC keeps the AbortError and its traceback's frames in a cycle.
                call = inner_uu(admitted.request.pop(), ctx)
                token = CALLER.set(ident)
                try:
                    return await call
                finally:
                    CALLER.reset(token)
            return h._replace(unary_unary=uu,  # type: ignore[no-any-return]
                              request_deserializer=None)

        inner_su = h.stream_unary  # Resync

        async def su(raw_iterator: AsyncIterator[bytes], ctx: _Ctx) -> Any:
            admitted = await self._admit(ctx, method, None, decode)
            if not isinstance(admitted, _Admitted):
                await self._abort(ctx, admitted)
                raise AssertionError("unreachable: abort raises")
            ident, client = admitted.ident, admitted.client

            async def checked() -> AsyncIterator[Any]:
                async for raw in raw_iterator:
                    self.trimmer.note(len(raw))
                    try:
                        self.limiter.payload(client, method, len(raw))
                        await self.precheck(method, raw)
                        request = decode(raw)
                        self.auth.authorize(ident, method, request.node_id)
                    except KvrouteError as exc:
                        if _reason(exc) != "precheck":
                            self.metrics.refused.labels(method, _reason(exc)).inc()
                        raise
                    yield request

            token = CALLER.set(ident)
            try:
                return await inner_su(checked(), ctx)
            finally:
                CALLER.reset(token)
        return h._replace(stream_unary=su,  # type: ignore[no-any-return]
                          request_deserializer=None)
