"""Value types of the etcd client: keys, watch events, transaction compares and ops.

Plain frozen dataclasses (no etcd library, no protobuf), so the placement store and its tests
never see protobuf messages; re-exported by :mod:`registry_service.store.etcd_client`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
