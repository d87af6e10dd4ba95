"""Failover and retry loops shared by the sync and asyncio clients; errors as kvroute types."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

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


class _Attempts:
    """One call's attempts over the options' targets: each attempt's target and timeout (within
    the call's total deadline), and after a retryable failure the back-off pause, moving on to
    the next target; the kvroute error once no attempt or time is left."""

    __slots__ = ("_backoffs", "_caller", "_deadline", "_timeout_s", "attempt")

    def __init__(self, caller: _Caller[Any], timeout_s: float | None) -> None:
        self._caller = caller
        self._timeout_s = timeout_s or caller.opts.timeout_s
        self._deadline = time.monotonic() + caller.opts.total_timeout_s
        self._backoffs = caller.opts.backoffs()
        self.attempt = 0

    def next(self) -> tuple[str, float]:
        """(target, timeout) of the next attempt."""
        targets = self._caller.opts.targets
        target = targets[self._caller.current % len(targets)]
        self.attempt += 1
        left = self._deadline - time.monotonic()
        return target, max(0.001, min(self._timeout_s, left))

    def pause_after(self, exc: grpc.RpcError, target: str) -> float:
        """Seconds to wait before the next attempt; raises the kvroute error when the failure
        is not retryable or no attempt or time is left."""
        o = self._caller.opts
        if exc.code() not in o.retry_codes or self.attempt >= o.attempts:
            raise as_kvroute_error(exc, target, self.attempt) from exc
        self._caller.current += 1
        pause = min(next(self._backoffs), self._deadline - time.monotonic())
        if pause <= 0:
            raise as_kvroute_error(exc, target, self.attempt) from exc
        return pause


C = TypeVar("C")


class _Caller(Generic[C]):
    """Channels and stubs per target (opened on first use) and the target in use."""

    def __init__(self, opts: ClientOptions, make_stub: Callable[[C], Any]) -> None:
        self.opts = opts
        self._make_stub = make_stub
        self._channels: dict[str, C] = {}
        self._stubs: dict[str, Any] = {}
        self.current = 0

    def _open(self, target: str) -> C:
        raise NotImplementedError

    def _stub(self, target: str) -> Any:
        stub = self._stubs.get(target)
        if stub is None:
            ch = self._channels[target] = self._open(target)
            stub = self._stubs[target] = self._make_stub(ch)
        return stub


class SyncCaller(_Caller[grpc.Channel]):
    """Calls a method on the current target; a retryable failure moves to the next one."""

    def _open(self, target: str) -> grpc.Channel:
        return sync_channel(target, self.opts)

    def call(self, method: str, request: Any, timeout_s: float | None) -> Any:
        """``stub.method(request)`` with deadlines, failover and back-off."""
        tries = _Attempts(self, timeout_s)
        while True:
            target, timeout = tries.next()
            try:
                return getattr(self._stub(target), method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                time.sleep(tries.pause_after(exc, target))

    def close(self) -> None:
        """Close every channel."""
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        self._stubs.clear()


class AsyncCaller(_Caller[grpc.aio.Channel]):
    """The asyncio form of :class:`SyncCaller`."""

    def _open(self, target: str) -> grpc.aio.Channel:
        return open_channel(target, self.opts.tls)

    async def call(self, method: str, request: Any, timeout_s: float | None) -> Any:
        """``await stub.method(request)`` with deadlines, failover and back-off."""
        tries = _Attempts(self, timeout_s)
        while True:
            target, timeout = tries.next()
            try:
                fn: Callable[..., Awaitable[Any]] = getattr(self._stub(target), method)
                return await fn(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                await asyncio.sleep(tries.pause_after(exc, target))

    async def close(self) -> None:
        """Close every channel."""
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()
        self._stubs.clear()
