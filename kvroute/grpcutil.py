"""gRPC plumbing shared by every server and client: TLS, health, reflection, error mapping."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvroute.client_auth import BearerToken, token_interceptors
from kvroute.errors import KvrouteError
from kvroute.settings import TLSSettings
from kvroute.telemetry import REQUEST_ID

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self_ = TypeVar("Self_")

GRPC_OPTIONS_KEEPALIVE: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
"""Client keepalive so a dead peer is noticed within ~30 s even on idle streams. Every kvroute
server accepts these pings (:data:`GRPC_SERVER_OPTIONS_KEEPALIVE`); a server keeping gRPC core's
defaults would answer the third with GOAWAY ``too_many_pings``."""

GRPC_SERVER_OPTIONS_KEEPALIVE: tuple[tuple[str, int], ...] = (
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)
"""Server side of :data:`GRPC_OPTIONS_KEEPALIVE`, for every kvroute gRPC server (use
:func:`server_options`). gRPC core's server defaults allow a ping without data only every
5 min and none while no call is open, and after 2 "ping strikes" close the connection with
GOAWAY ``too_many_pings`` (grpc ``doc/keepalive.md``). ``min_ping_interval_without_data_ms``
(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS) is the shortest gap between pings the
server accepts: half the client's 20 s, room for timer jitter; ``keepalive_permit_without_calls``
accepts pings on a connection with no call in flight (idle channels, between watch restarts).
Strikes keep the default (2): a peer pinging faster than every 10 s is still cut off."""


def merge_options(base: Sequence[tuple[str, Any]], extra: Sequence[tuple[str, Any]] = (),
                  ) -> list[tuple[str, Any]]:
    """``base`` then ``extra``, an ``extra`` entry replacing ``base``'s of the same name (gRPC
    itself does not promise which of two equal names wins)."""
    names = {name for name, _ in extra}
    return [*(o for o in base if o[0] not in names), *extra]


def server_options(*extra: tuple[str, Any]) -> list[tuple[str, Any]]:
    """Options for ``grpc.aio.server``: :data:`GRPC_SERVER_OPTIONS_KEEPALIVE` plus ``extra``
    (which may override them)."""
    return merge_options(GRPC_SERVER_OPTIONS_KEEPALIVE, extra)


def reconnect_options(max_wait_s: float) -> list[tuple[str, int]]:
    """Channel options capping gRPC's own reconnect back-off (default grows to 120 s), so a
    server that comes back is used again within about ``max_wait_s``."""
    cap = max(100, int(max_wait_s * 1000))
    return [("grpc.initial_reconnect_backoff_ms", min(100, cap)),
            ("grpc.min_reconnect_backoff_ms", min(100, cap)),
            ("grpc.max_reconnect_backoff_ms", cap)]


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options raising both send and receive limits to ``max_bytes``."""
    return [("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes)]


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(tls: TLSSettings) -> grpc.ServerCredentials | None:
    """Server TLS credentials; with ``ca_file`` clients must present certs it signed (mTLS)."""
    if not tls.cert_file:
        return None
    pair = [(_read(tls.key_file), _read(tls.cert_file))]
    if tls.ca_file:
        return grpc.ssl_server_credentials(pair, root_certificates=_read(tls.ca_file),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def open_channel(target: str, tls: TLSSettings | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` (plaintext unless ``tls`` is enabled), with keepalive
    (:data:`GRPC_OPTIONS_KEEPALIVE`; an entry of ``options`` with the same name replaces it).

    With ``tls.token`` or ``tls.token_file`` every call carries ``authorization: Bearer ...``.
    """
    opts = merge_options(GRPC_OPTIONS_KEEPALIVE, options)
    interceptors = (token_interceptors(BearerToken(tls.token, tls.token_file))
                    if tls is not None and (tls.token or tls.token_file) else None)
    if tls is None or not tls.enabled:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file) if tls.ca_file else None,
        private_key=_read(tls.key_file) if tls.key_file else None,
        certificate_chain=_read(tls.cert_file) if tls.cert_file else None,
    )
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)


class HealthReporter:
    """Wraps the standard health servicer; ``set_serving(False)`` on drain."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self.servicer = health_aio.HealthServicer()
        self._names = ["", *service_names]

    async def set_serving(self, serving: bool) -> None:
        """Mark every service (and the overall server) SERVING or NOT_SERVING."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self._names:
            await self.servicer.set(name, status)


def add_health_and_reflection(server: grpc.aio.Server, service_full_names: Sequence[str],
                              ) -> HealthReporter:
    """Register grpc.health.v1 and reflection for the given services on ``server``."""
    reporter = HealthReporter(service_full_names)
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, server)
    reflection.enable_server_reflection(
        [*service_full_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    return reporter


def bind(server: grpc.aio.Server, listen: str, tls: TLSSettings) -> int:
    """Bind ``listen`` (HOST:PORT, port 0 = free) with TLS if configured; returns the port."""
    creds = server_credentials(tls)
    port = (server.add_secure_port(listen, creds) if creds is not None
            else server.add_insecure_port(listen))
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {listen}")
    return port


def _status(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, KvrouteError):
        return exc.code, exc.message
    log.error("unexpected error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {exc!r}"


# The wrappers abort *after* leaving their ``except`` block: aborting inside it would keep the
# exception (and through its traceback every frame's locals, e.g. a 10 MB request message)
# alive in a reference cycle until the next full garbage collection. Measured: a flood of
# refused 3 MB heartbeats grew the registry's RSS by ~400 MB that way.


def unary_errors(fn: Callable[[Self_, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
                 ) -> Callable[[Self_, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Turn KvrouteError into its gRPC status and any other exception into INTERNAL (logged)."""

    @functools.wraps(fn)
    async def wrapper(self: Self_, request: Req, context: grpc.aio.ServicerContext[Req, Resp],
                      ) -> Resp:
        token = REQUEST_ID.set(str(getattr(request, "request_id", "") or ""))
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # KvrouteError included
            code, message = _status(exc, fn.__name__)
        finally:
            REQUEST_ID.reset(token)
        del request
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return wrapper


def stream_errors(fn: Callable[[Self_, Any, grpc.aio.ServicerContext[Any, Any]],
                               AsyncIterator[Resp]],
                  ) -> Callable[[Self_, Any, grpc.aio.ServicerContext[Any, Any]],
                                AsyncIterator[Resp]]:
    """The same as :func:`unary_errors` for server-streaming and bidirectional methods."""

    @functools.wraps(fn)
    async def wrapper(self: Self_, request: Any, context: grpc.aio.ServicerContext[Any, Any],
                      ) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
            return
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # KvrouteError included
            code, message = _status(exc, fn.__name__)
        await context.abort(code, message)

    return wrapper
