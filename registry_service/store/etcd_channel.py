"""gRPC plumbing of the etcd client: channels per endpoint, failover, retries, error mapping.

No etcd library here (only grpc, and retries through :mod:`kvroute.retry`);
:mod:`registry_service.store.etcd_client` builds the etcd stubs on these channels.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from kvroute.retry import retrying
from registry_service.store.etcd_errors import EtcdError, EtcdLeaseNotFound, EtcdUnavailable
from registry_service.store.etcd_settings import EtcdSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

AUTH_EXPIRED = ("invalid auth token", "auth token is expired", "revision of auth store is old")
"""etcd error texts meaning "authenticate again and retry"."""
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
"""Status codes worth retrying (on the next endpoint when there are several)."""
NOT_SENT = "failed to connect to all addresses"
"""gRPC's UNAVAILABLE text when no connection existed, so the request was never sent."""


class Transient(Exception):
    """A retryable failure that is not an AioRpcError (stream ended, local deadline)."""


def is_auth_expired(exc: BaseException) -> bool:
    """True when etcd rejected the call because our auth token is no longer valid."""
    return isinstance(exc, grpc.aio.AioRpcError) and any(
        s in (exc.details() or "") for s in AUTH_EXPIRED)


def open_etcd_channel(settings: EtcdSettings, target: str) -> grpc.aio.Channel:
    """A channel to one etcd endpoint: TLS when configured, keepalive, raised message limit."""
    ka_ms = int(settings.etcd_keepalive_s * 1000)
    opts: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", ka_ms),
        ("grpc.keepalive_timeout_ms", ka_ms),
        # etcd (PermitWithoutStream=false) sends GOAWAY to clients pinging with no stream open.
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", settings.etcd_max_message_bytes),
        ("grpc.max_send_message_length", settings.etcd_max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if not settings.tls_enabled:
        return grpc.aio.insecure_channel(target, options=opts)
    if settings.etcd_server_name:
        opts.append(("grpc.ssl_target_name_override", settings.etcd_server_name))

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(settings.etcd_ca_file),
        private_key=read(settings.etcd_key_file),
        certificate_chain=read(settings.etcd_cert_file))
    return grpc.aio.secure_channel(target, creds, options=opts)


class EndpointPool:
    """One lazily opened channel per endpoint and the index of the one in use.

    Channels stay open until :meth:`close` so streams on an endpoint we failed away from are
    not cut; failover moves round-robin to the next endpoint.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.endpoints = settings.endpoints
        self.current = 0
        self.closed = False
        self._channels: list[grpc.aio.Channel | None] = [None] * len(self.endpoints)

    def channel(self, index: int) -> grpc.aio.Channel:
        """The channel of endpoint ``index`` (opened on first use)."""
        if self.closed:
            raise EtcdUnavailable("etcd client is closed")
        chan = self._channels[index]
        if chan is None:
            chan = self._channels[index] = open_etcd_channel(self.settings,
                                                             self.endpoints[index])
        return chan

    def failover(self, failed: int) -> None:
        """Move on from endpoint ``failed``, unless another caller already did."""
        if len(self.endpoints) > 1 and self.current == failed:
            self.current = (failed + 1) % len(self.endpoints)
            log.warning("etcd endpoint %s failing; trying %s", self.endpoints[failed],
                        self.endpoints[self.current])

    def describe(self) -> str:
        """The endpoints, for error messages."""
        return ", ".join(self.endpoints)

    async def close(self) -> None:
        """Close every channel (cancelling its calls)."""
        self.closed = True
        for i, chan in enumerate(self._channels):
            if chan is not None:
                self._channels[i] = None
                await chan.close(None)


def _final(settings: EtcdSettings, what: str, exc: grpc.aio.AioRpcError | Transient,
           ) -> Exception:
    if isinstance(exc, grpc.aio.AioRpcError):
        return translate(settings, what, exc)
    return EtcdUnavailable(
        f"etcd {what} failed at {', '.join(settings.endpoints)} (up to "
        f"{settings.etcd_retry_attempts} attempts, deadline {settings.etcd_call_timeout_s}s "
        f"each): {exc}")


def translate(settings: EtcdSettings, what: str, exc: grpc.aio.AioRpcError) -> Exception:
    """Our error type for a final AioRpcError of operation ``what``."""
    code, details = exc.code(), exc.details() or ""
    where = ", ".join(settings.endpoints)
    if code in TRANSIENT or is_auth_expired(exc):
        return EtcdUnavailable(
            f"etcd {what} failed at {where} (up to {settings.etcd_retry_attempts} attempts, "
            f"deadline {settings.etcd_call_timeout_s}s each): {code.name}: {details}")
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return EtcdLeaseNotFound(f"etcd {what}: {details}")
    hint = (" (raise --etcd-max-message-bytes)"
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message" in details else "")
    return EtcdError(f"etcd {what} rejected by {where}: {code.name}: {details}{hint}")


async def with_retries(settings: EtcdSettings, what: str, attempt: Callable[[], Awaitable[T]],
                       *, idempotent: bool = True) -> T:
    """Run ``attempt`` up to ``etcd_retry_attempts`` times with jittered exponential backoff.

    Always retried: an expired auth token (the attempt re-authenticates before raising) and
    UNAVAILABLE before the request was sent ("failed to connect"). When ``idempotent``, also
    any UNAVAILABLE, DEADLINE_EXCEEDED and :class:`Transient` (the request may have been
    applied; repeating it must be harmless). The last failure becomes EtcdUnavailable (naming
    the endpoints), EtcdLeaseNotFound or EtcdError.
    """
    def retryable(exc: BaseException) -> bool:
        if isinstance(exc, Transient):
            return idempotent
        if not isinstance(exc, grpc.aio.AioRpcError):
            return False
        if is_auth_expired(exc):
            return True
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return idempotent or NOT_SENT in (exc.details() or "")
        return idempotent and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    try:  # first attempt without tenacity's per-call overhead (most calls succeed)
        return await attempt()
    except (grpc.aio.AioRpcError, Transient) as exc:
        if settings.etcd_retry_attempts == 1 or not retryable(exc):
            raise _final(settings, what, exc) from exc
    await asyncio.sleep(random.uniform(0, 0.1))
    try:
        async for state in retrying(retryable, first_s=0.1, max_s=2.0,
                                    attempts=settings.etcd_retry_attempts - 1):
            with state:
                return await attempt()
    except (grpc.aio.AioRpcError, Transient) as exc:
        raise _final(settings, what, exc) from exc
    raise AssertionError("unreachable")  # pragma: no cover
