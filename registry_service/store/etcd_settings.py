"""Settings, value types and errors of the etcd client (no etcd library imported here).

:mod:`registry_service.store.etcd_client` re-exports everything defined here, so callers import
from there. The types are plain frozen dataclasses so the placement store and its tests never see
protobuf messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvroute.errors import KvrouteError, NotFound, Unavailable
from kvroute.settings import parse_hostport, require, setting

MIB = 1024 * 1024


@dataclass(frozen=True)
class EtcdSettings:
    """How kvroute reaches etcd. Flags ``--etcd-*``, variables ``KVROUTE_ETCD_*``."""

    etcd_endpoints: tuple[str, ...] = setting(
        ("127.0.0.1:2379",),
        "etcd client endpoints HOST:PORT, comma separated; several = round-robin failover")
    etcd_prefix: str = setting("/kvroute/v1/", "Key prefix under which kvroute keeps its keys")
    etcd_ca_file: str = setting(
        "", "PEM CA bundle to verify etcd's server certificate (enables TLS to etcd)")
    etcd_cert_file: str = setting("", "PEM client certificate for etcd mTLS")
    etcd_key_file: str = setting("", "PEM client key for etcd mTLS")
    etcd_server_name: str = setting(
        "", "TLS server name to expect from etcd (override, when endpoints are IPs)")
    etcd_username: str = setting(
        "", "etcd user (enables authentication; the token is refreshed when it expires)")
    etcd_password: str = setting("", "Password of etcd_username")
    etcd_call_timeout_s: float = setting(3.0, "Deadline of every unary etcd call, in seconds")
    etcd_connect_timeout_s: float = setting(
        5.0, "How long connect() waits for an etcd endpoint to answer, in seconds")
    etcd_max_message_bytes: int = setting(
        64 * MIB, "gRPC message limit to etcd (prefix reads larger than this fail)")
    etcd_retry_attempts: int = setting(
        4, "Attempts per etcd call on transient errors (unavailable, deadline, expired token)")
    etcd_keepalive_s: float = setting(
        10.0, "gRPC keepalive ping interval to etcd; a silent etcd is noticed within ~2x this")

    def __post_init__(self) -> None:
        require(len(self.etcd_endpoints) > 0, "etcd_endpoints", "give at least one HOST:PORT")
        for ep in self.etcd_endpoints:
            parse_hostport(ep.removeprefix("http://").removeprefix("https://"),
                           "etcd_endpoints")
        require(self.etcd_prefix.endswith("/"), "etcd_prefix", "must end with '/'")
        require(bool(self.etcd_cert_file) == bool(self.etcd_key_file), "etcd_cert_file",
                "etcd cert and key must be given together")
        require(not self.etcd_password or bool(self.etcd_username), "etcd_password",
                "a password needs --etcd-username")
        require(self.etcd_call_timeout_s > 0, "etcd_call_timeout_s", "must be > 0")
        require(self.etcd_connect_timeout_s > 0, "etcd_connect_timeout_s", "must be > 0")
        require(self.etcd_max_message_bytes >= 4 * MIB, "etcd_max_message_bytes",
                "must be >= 4 MiB")
        require(1 <= self.etcd_retry_attempts <= 20, "etcd_retry_attempts", "must be 1..20")
        require(self.etcd_keepalive_s >= 5, "etcd_keepalive_s",
                "must be >= 5 (etcd rejects more frequent pings)")

    @property
    def tls_enabled(self) -> bool:
        """True when etcd is reached over TLS."""
        return bool(self.etcd_ca_file or self.etcd_cert_file)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Endpoints without any ``http(s)://`` scheme."""
        return tuple(ep.removeprefix("http://").removeprefix("https://")
                     for ep in self.etcd_endpoints)


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One etcd key with its metadata (revisions are etcd store revisions)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change seen by a watch. For ``delete`` the value is empty and ``kv.mod_revision`` is
    the revision of the deletion."""

    kind: Literal["put", "delete"]
    kv: KeyValue


CompareTarget = Literal["version", "create_revision", "mod_revision", "value", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction: ``target(key) op value``."""

    key: bytes
    target: CompareTarget
    op: CompareOp
    value: int | bytes


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a transaction branch (build with :func:`op_put` etc.)."""

    kind: Literal["put", "delete", "get"]
    key: bytes
    value: bytes = b""
    lease: int = 0
    range_end: bytes = b""


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of :meth:`EtcdClient.txn`. ``gets`` holds one tuple of KeyValues per ``get`` op
    of the branch that ran, in order."""

    succeeded: bool
    revision: int
    gets: tuple[tuple[KeyValue, ...], ...] = field(default=())


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # every key


def compare_version(key: bytes, op: CompareOp, version: int) -> Compare:
    """``version(key) op version``; ``compare_version(k, "==", 0)`` = key does not exist."""
    return Compare(key, "version", op, version)


def compare_create_revision(key: bytes, op: CompareOp, revision: int) -> Compare:
    """``create_revision(key) op revision``."""
    return Compare(key, "create_revision", op, revision)


def compare_mod_revision(key: bytes, op: CompareOp, revision: int) -> Compare:
    """``mod_revision(key) op revision`` (optimistic concurrency on one key)."""
    return Compare(key, "mod_revision", op, revision)


def compare_value(key: bytes, op: CompareOp, value: bytes) -> Compare:
    """``value(key) op value``."""
    return Compare(key, "value", op, value)


def compare_lease(key: bytes, op: CompareOp, lease: int) -> Compare:
    """``lease(key) op lease`` (0 = no lease)."""
    return Compare(key, "lease", op, lease)


def op_put(key: bytes, value: bytes, lease: int = 0) -> Op:
    """Put ``key`` = ``value`` (attached to ``lease`` when non-zero)."""
    return Op("put", key, value, lease)


def op_delete(key: bytes) -> Op:
    """Delete one key."""
    return Op("delete", key)


def op_delete_prefix(prefix: bytes) -> Op:
    """Delete every key starting with ``prefix``."""
    return Op("delete", prefix, range_end=prefix_range_end(prefix))


def op_get(key: bytes) -> Op:
    """Read one key inside the transaction (result in ``TxnResult.gets``)."""
    return Op("get", key)


class EtcdUnavailable(Unavailable):
    """etcd did not answer (every endpoint, every retry) within the deadlines."""


class EtcdLeaseNotFound(NotFound):
    """The lease named in a put does not exist any more (expired or revoked)."""


class EtcdError(KvrouteError):
    """etcd rejected a request (permission denied, bad request...); retrying will not help."""


class WatchCompacted(Exception):
    """A watch's start revision was compacted away: list the prefix again and re-watch from
    the listed revision + 1."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted revisions up to {compact_revision}; re-list and "
                         f"re-watch")
        self.compact_revision = compact_revision
