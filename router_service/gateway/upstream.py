"""The gateway's HTTP/1.1 client to the engines: keep-alive connections per engine, responses
parsed by ``httptools`` (llhttp, the parser uvicorn uses), bodies relayed chunk by chunk.

Why not ``aiohttp.ClientSession``: measured on this machine, sequential direct-vs-proxied pairs
through an aiohttp server, its client added 0.54-1.07 ms per 256-token request where a plain
keep-alive connection added 0.27-0.43 ms; the gateway's forwarding is one POST with a body
already in hand, so the general client's per-request machinery (URL objects, header multidicts,
cookie jar, signals, timeouts, response objects) is most of the cost. HTTP parsing stays in a
well-kept library: this module only writes the request line and headers it was given.

Errors: :class:`ConnectFailed` when nothing of a response arrived (connection refused, reset or
closed before the status line, connect timeout) — the proxy may retry that elsewhere;
:class:`ResponseBroken` when the connection died after the status line; ``TimeoutError`` when
the engine sent nothing for ``read_timeout_s``. A pooled connection that the engine closed while
idle is retried once on a fresh connection before anything is reported.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast

import httptools

_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 18


class UpstreamError(Exception):
    """Base of the upstream client's errors."""


class ConnectFailed(UpstreamError):
    """No response byte arrived (connect error, reset or close before the status line)."""


class ResponseBroken(UpstreamError):
    """The connection failed after the status line (the response is incomplete)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where an engine listens: host, port, TLS."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, address: str, default_tls: bool) -> Target:
        """``http://h:p``, ``https://h:p`` or ``h:p``."""
        tls = default_tls
        if "://" in address:
            scheme, _, address = address.partition("://")
            tls = scheme == "https"
        address = address.split("/", 1)[0]
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"engine address {address!r} is not HOST:PORT")
        return cls(host.strip("[]"), int(port), tls)


class Response(asyncio.Protocol):
    """One keep-alive connection; while a request is in flight, also its response."""

    def __init__(self, pool: Upstream, target: Target) -> None:
        self.pool = pool
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.content_type = ""
        self.keep_alive = True
        self.reused = False
        self._head: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._wake: asyncio.Future[None] | None = None
        self._complete = False
        self._error: BaseException | None = None
        self._released = False
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not a subclass of asyncio.Transport, but has its methods
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._arm_timer()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ResponseBroken(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
        self.pool.forget(self)
        if self._head is not None and not self._complete:
            why = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
            self._fail(ConnectFailed(why) if not self._head.done() else ResponseBroken(why))

    def pause_writing(self) -> None:  # request bodies are written at once; nothing to pause
        pass

    # -- httptools callbacks ----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.keep_alive and bool(self.parser.should_keep_alive())
        for k, v in self.headers:
            if k.lower() == "content-type":
                self.content_type = v.split(";", 1)[0].strip().lower()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and self.transport is not None and not self._paused:
            self.transport.pause_reading()  # a slow client: stop reading the engine
            self._paused = True
        self._wakeup()

    def on_message_complete(self) -> None:
        self._complete = True
        self._cancel_timer()
        self._wakeup()

    # -- request ----------------------------------------------------------------------------
    def _start(self, head: bytes, body: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.status, self.headers, self.content_type = 0, [], ""
        self._chunks.clear()
        self._buffered = 0
        self._complete = self._released = False
        self._error = None
        self._head = asyncio.get_running_loop().create_future()
        self.transport.writelines((head, body))
        self._arm_timer()
        return self._head

    def _arm_timer(self) -> None:
        timeout = self.pool.read_timeout_s
        if timeout and not self._complete and self._head is not None:
            self._cancel_timer()
            self._timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._fail(TimeoutError(f"no bytes from {self.target.host}:{self.target.port} for "
                                f"{self.pool.read_timeout_s} s"))
        self.close()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved here; the awaiting caller re-raises it
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # -- consumer ---------------------------------------------------------------------------
    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoded); raises on a broken response."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _LOW_WATER and self.transport is not None:
                    self.transport.resume_reading()
                    self._paused = False
                yield chunk
            if self._complete:
                return
            if self._error is not None:
                raise self._error
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake
            self._wake = None

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([c async for c in self.iter_chunks()])

    def release(self) -> None:
        """Done with the response: the connection returns to the pool (or closes)."""
        if self._released:
            return
        self._released = True
        self._cancel_timer()
        if self._complete and self.keep_alive and self._error is None and not self._paused:
            self.pool.give_back(self)
        else:
            self._close_transport()

    def close(self) -> None:
        """Abandon the response (client gone, error): close the connection, so the engine sees
        the disconnect and aborts the request. No-op once released."""
        if self._released:
            return
        self._released = True
        self._cancel_timer()
        self._close_transport()

    def _close_transport(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Upstream:
    """Keep-alive connections to the engines, at most ``max_idle`` idle ones per engine."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float,
                 ssl_context: ssl.SSLContext | None = None, max_idle: int = 64) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.ssl_context = ssl_context
        self.max_idle = max_idle
        self._idle: dict[Target, list[Response]] = {}
        self._heads: dict[tuple[Target, str], bytes] = {}

    def forget(self, conn: Response) -> None:
        """A connection closed: never hand it out again."""
        idle = self._idle.get(conn.target)
        if idle and conn in idle:
            idle.remove(conn)

    def give_back(self, conn: Response) -> None:
        """A finished keep-alive connection goes back to its engine's idle list."""
        idle = self._idle.setdefault(conn.target, [])
        if len(idle) < self.max_idle and conn.transport is not None \
                and not conn.transport.is_closing():
            conn.reused = True
            idle.append(conn)
        else:
            conn._close_transport()

    async def _connect(self, target: Target) -> Response:
        loop = asyncio.get_running_loop()
        ctx = (self.ssl_context or ssl.create_default_context()) if target.tls else None
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: Response(self, target), target.host, target.port, ssl=ctx,
                server_hostname=target.host if ctx else None), self.connect_timeout_s)
        except TimeoutError:
            raise ConnectFailed(f"connect to {target.host}:{target.port} timed out after "
                                f"{self.connect_timeout_s} s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {target.host}:{target.port}: "
                                f"{exc.strerror or exc}") from None
        return proto

    def _head(self, target: Target, path: str, headers: Mapping[str, str], size: int) -> bytes:
        fixed = self._heads.get((target, path))
        if fixed is None:
            fixed = f"POST {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n".encode()
            self._heads[(target, path)] = fixed
        lines = [fixed]
        for k, v in headers.items():
            lines.append(f"{k}: {v}\r\n".encode("latin-1"))
        lines.append(b"Content-Length: %d\r\n\r\n" % size)
        return b"".join(lines)

    async def post(self, target: Target, path: str, headers: Mapping[str, str],
                   body: bytes) -> Response:
        """Send the request and wait for the response head; the caller reads the body and then
        calls ``release()`` (done) or ``close()`` (abandon)."""
        head = self._head(target, path, headers, len(body))
        for attempt in (0, 1):
            idle = self._idle.get(target)
            conn = idle.pop() if idle else await self._connect(target)
            try:
                await conn._start(head, body)
                return conn
            except ConnectFailed:
                conn.close()
                if not conn.reused or attempt:  # a fresh connection failed: report it
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for conn in list(idle):
                conn._close_transport()
        self._idle.clear()
