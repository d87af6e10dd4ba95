"""Failover and retry loops shared by the sync and asyncio clients; errors as kvroute types."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from kvroute import errors
from kvroute.client.options import ClientOptions
from kvroute.grpcutil import GRPC_OPTIONS_KEEPALIVE, open_channel

T = TypeVar("T")

_ERRORS: dict[grpc.StatusCode, type[errors.KvrouteError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}


def as_kvroute_error(exc: grpc.RpcError, target: str, attempts: int) -> errors.KvrouteError:
    """The kvroute error type of a gRPC status (``KvrouteError`` for others), naming where."""
    code: grpc.StatusCode = exc.code()
    details = exc.details() or code.name
    cls = _ERRORS.get(code, errors.KvrouteError)
    err = cls(f"{details} (from {target}, after {attempts} attempt"
              f"{'s' if attempts != 1 else ''})")
    err.code = code
    return err


def sync_channel(target: str, opts: ClientOptions) -> grpc.Channel:
    """A blocking channel to ``target`` with the options' TLS."""
    tls = opts.tls
    options: list[tuple[str, Any]] = list(GRPC_OPTIONS_KEEPALIVE)
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))

    def read(p: str) -> bytes | None:
        return Path(p).read_bytes() if p else None

    creds = grpc.ssl_channel_credentials(read(tls.ca_file), read(tls.key_file),
                                         read(tls.cert_file))
    return grpc.secure_channel(target, creds, options=options)


class SyncCaller:
    """Calls a method on the current target; a retryable failure moves to the next one."""

    def __init__(self, opts: ClientOptions, make_stub: Callable[[grpc.Channel], Any]) -> None:
        self.opts = opts
        self._make_stub = make_stub
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, Any] = {}
        self.current = 0

    def _stub(self, target: str) -> Any:
        stub = self._stubs.get(target)
        if stub is None:
            ch = self._channels[target] = sync_channel(target, self.opts)
            stub = self._stubs[target] = self._make_stub(ch)
        return stub

    def call(self, method: str, request: Any, timeout_s: float | None) -> Any:
        """``stub.method(request)`` with deadlines, failover and back-off."""
        o = self.opts
        deadline = time.monotonic() + o.total_timeout_s
        backoffs = o.backoffs()
        attempt = 0
        while True:
            target = o.targets[self.current % len(o.targets)]
            attempt += 1
            left = deadline - time.monotonic()
            try:
                return getattr(self._stub(target), method)(
                    request, timeout=max(0.001, min(timeout_s or o.timeout_s, left)))
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in o.retry_codes or attempt >= o.attempts:
                    raise as_kvroute_error(exc, target, attempt) from exc
                self.current += 1
                pause = min(next(backoffs), deadline - time.monotonic())
                if pause <= 0:
                    raise as_kvroute_error(exc, target, attempt) from exc
                time.sleep(pause)

    def close(self) -> None:
        """Close every channel."""
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        self._stubs.clear()


class AsyncCaller:
    """The asyncio form of :class:`SyncCaller`."""

    def __init__(self, opts: ClientOptions, make_stub: Callable[[grpc.aio.Channel], Any]) -> None:
        self.opts = opts
        self._make_stub = make_stub
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, Any] = {}
        self.current = 0

    def _stub(self, target: str) -> Any:
        stub = self._stubs.get(target)
        if stub is None:
            ch = self._channels[target] = open_channel(target, self.opts.tls)
            stub = self._stubs[target] = self._make_stub(ch)
        return stub

    async def call(self, method: str, request: Any, timeout_s: float | None) -> Any:
        """``await stub.method(request)`` with deadlines, failover and back-off."""
        o = self.opts
        deadline = time.monotonic() + o.total_timeout_s
        backoffs = o.backoffs()
        attempt = 0
        while True:
            target = o.targets[self.current % len(o.targets)]
            attempt += 1
            left = deadline - time.monotonic()
            try:
                fn: Callable[..., Awaitable[Any]] = getattr(self._stub(target), method)
                return await fn(request, timeout=max(0.001, min(timeout_s or o.timeout_s, left)))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in o.retry_codes or attempt >= o.attempts:
                    raise as_kvroute_error(exc, target, attempt) from exc
                self.current += 1
                pause = min(next(backoffs), deadline - time.monotonic())
                if pause <= 0:
                    raise as_kvroute_error(exc, target, attempt) from exc
                await asyncio.sleep(pause)

    async def close(self) -> None:
        """Close every channel."""
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()
        self._stubs.clear()
