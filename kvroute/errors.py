"""Error types that carry a gRPC status code and a message a person can act on.

Servicers raise these; :func:`kvroute.grpcutil.grpc_errors` turns them into the matching gRPC
status. Clients get the code back through ``grpc.aio.AioRpcError``.
"""

from __future__ import annotations

import grpc


class KvrouteError(Exception):
    """Base error; ``code`` is the gRPC status the server answers with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KvrouteError):
    """The caller sent something malformed (field named in the message)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KvrouteError):
    """An unknown node, model or request id."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KvrouteError):
    """A node id already registered with a live lease and a different address."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(KvrouteError):
    """Incompatible configuration, such as a block-size or hash-scheme mismatch."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(KvrouteError):
    """Past a configured size or count limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(KvrouteError):
    """A dependency (etcd, the registry, every node) cannot be reached now; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(KvrouteError):
    """A dependency did not answer within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(KvrouteError):
    """The call carries no credentials the server accepts (no client certificate, no token)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KvrouteError):
    """The caller is known but may not do this (a reader writing, an agent of another node)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ConfigError(ValueError):
    """Invalid settings (bad flag or KVROUTE_* value); the message names the flag."""
