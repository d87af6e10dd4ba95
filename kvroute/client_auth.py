"""Bearer-token credentials of a gRPC client: ``authorization: Bearer <token>`` on every call.

For deployments without mTLS client certificates (Kubernetes Secrets, projected service
account tokens): the token comes from a setting or from a file that is re-read when it
changes (checked at most once a second), so a rotated Secret is picked up without a restart.
Works on plaintext and TLS channels alike (plaintext exposes the token to the network path).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import grpc

log = logging.getLogger(__name__)
RELOAD_CHECK_S = 1.0


class BearerToken:
    """A token given inline or read from ``path`` (whitespace stripped, re-read on change)."""

    def __init__(self, token: str = "", path: str = "") -> None:
        self._token = token.strip()
        self._path = path
        self._mtime: float | None = None
        self._checked = 0.0
        if path:
            self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            mtime = os.stat(self._path).st_mtime
            if mtime != self._mtime:
                with open(self._path, encoding="utf-8") as fh:
                    self._token = fh.read().strip()
                self._mtime = mtime
        except OSError as exc:
            if force:
                raise
            log.warning("token file %s unreadable (%s): sending the last token", self._path,
                        exc)

    def value(self) -> str:
        """The current token."""
        if self._path:
            self._reload()
        return self._token


def _with_token(details: grpc.aio.ClientCallDetails, token: BearerToken,
                ) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
    metadata.add("authorization", f"Bearer {token.value()}")
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: BearerToken) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        return await continuation(_with_token(client_call_details, self.token), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: BearerToken) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any,
                                     request: Any) -> Any:
        return await continuation(_with_token(client_call_details, self.token), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: BearerToken) -> None:
        self.token = token

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(_with_token(client_call_details, self.token),
                                  request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: BearerToken) -> None:
        self.token = token

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(_with_token(client_call_details, self.token),
                                  request_iterator)


def token_interceptors(token: BearerToken) -> list[Any]:
    """Client interceptors adding the token to unary and streaming calls."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
