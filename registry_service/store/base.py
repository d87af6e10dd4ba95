"""The ``PlacementStore`` interface: durable node records, status and block placement.

The registry core writes through a store and follows it: ``load()`` returns everything as typed
events plus a revision, ``watch(revision)`` yields later events (from any replica). The etcd
store persists under per-node leases (DESIGN §4); the memory store keeps the same semantics in
one process for unit tests and single-process benchmarks.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from registry_service.store.hubs import HubDirectory

HashArray = npt.NDArray[np.uint64]
"""Canonical block hashes, packed little-endian uint64 on the wire."""


class StoreUnavailable(Exception):
    """The backing store did not answer in time or could not be reached (retry later)."""


class StoreConflict(Exception):
    """A compare-and-swap lost against a concurrent writer (another replica)."""


class WatchRestart(Exception):
    """The watch cannot continue from its revision (compaction): ``load()`` again."""


@dataclass(frozen=True)
class NodeRecord:
    """A registered node (``nodes/<node_id>``), alive while its lease is."""

    node_id: str
    address: str
    model: str
    block_size: int
    capacity_blocks: int
    labels: dict[str, str]
    epoch: int
    lease_id: int
    lease_ttl_s: int
    registered_unix_ms: int
    token_sha256: str = ""
    """SHA-256 (hex) of the registration's write token: Heartbeat, Resync and DeregisterNode
    must carry the token. Never sent to readers. Empty in records of older registries."""
    owner: str = ""
    """Identity that registered this incarnation (``agent:<node>``, ``admin:<name>``, or
    ``anonymous`` with --auth none), for the log and operators reading etcd."""
    role: str = "both"
    """Disaggregated prefill/decode role: prefill, decode or both."""


@dataclass(frozen=True)
class NodeStatus:
    """Latest usage of a node (``status/<node_id>``), written at most every few seconds."""

    used_blocks: int = 0
    evictions_total: int = 0
    queue_depth: int = 0
    running: int = 0
    capacity_blocks: int = 0
    eviction_rate: float = 0.0
    heartbeat_unix_ms: int = 0
    engine_block_size: int = 0
    """The engine's own block size in tokens (0 = not reported)."""
    engine_lookahead_tokens: int = 0
    """Tokens after each block the engine's block hashes cover (0 = none)."""
    index_state: int = 0
    """The agent's IndexState (registry.proto; 0 = not reported)."""
    index_note: str = ""
    """Why the agent's index is not complete."""
    prefill_tokens_per_s: float = 0.0
    """Engine prefill rate measured by the agent (issue 19; 0 = not measured)."""


_NONE: HashArray = np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class Delta:
    """One heartbeat's block changes: ``cleared`` (every tier) first, then ``removed``, then
    ``stored``, per tier (device: ``stored``/``removed``; the offloaded lower tier:
    ``stored_offloaded``/``removed_offloaded``)."""

    seq: int
    base_gen: int
    cleared: bool
    stored: HashArray
    removed: HashArray
    stored_offloaded: HashArray = field(default_factory=lambda: _NONE)
    """Blocks now held on an offloading medium (the lower tier)."""
    removed_offloaded: HashArray = field(default_factory=lambda: _NONE)
    """Blocks no longer held on any offloading medium."""

    @property
    def events(self) -> int:
        """Block events carried (stored + removed, every tier)."""
        return int(self.stored.size + self.removed.size + self.stored_offloaded.size
                   + self.removed_offloaded.size)

    @property
    def has_offloaded(self) -> bool:
        """True when the delta changes the offloaded tier."""
        return bool(self.stored_offloaded.size or self.removed_offloaded.size)


# Typed events (from load() and watch()).

@dataclass(frozen=True)
class NodePut:
    """A node record was written (registration)."""

    record: NodeRecord


@dataclass(frozen=True)
class NodeGone:
    """A node record was deleted: deregistration or lease expiry (its keys went with it)."""

    node_id: str
    epoch: int


@dataclass(frozen=True)
class StatusPut:
    """A node's status was written."""

    node_id: str
    status: NodeStatus


@dataclass(frozen=True)
class DeltaPut:
    """A delta batch was appended for ``node_id``/``epoch``."""

    node_id: str
    epoch: int
    delta: Delta


@dataclass(frozen=True)
class SnapshotPut:
    """A complete snapshot generation: the node's whole block set after ``through_seq``.

    ``replace`` marks a Resync (the set replaces whatever the node had); otherwise it is a
    compaction of deltas the follower has already applied.
    """

    node_id: str
    epoch: int
    gen: int
    through_seq: int
    replace: bool
    hashes: HashArray
    offloaded: HashArray = field(default_factory=lambda: _NONE)
    """The node's whole offloaded (lower-tier) set; empty in snapshots of older registries."""


StoreEvent = NodePut | NodeGone | StatusPut | DeltaPut | SnapshotPut


@dataclass
class LoadResult:
    """Everything in the store as events, and the revision to watch from (exclusive)."""

    events: list[StoreEvent] = field(default_factory=list)
    revision: int = 0


class PlacementStore(abc.ABC):
    """Durable placement. Every method raises StoreUnavailable when the backend is down."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; pending watches end."""

    @abc.abstractmethod
    async def get_node(self, node_id: str) -> NodeRecord | None:
        """The node's current record, read from the store (not a cache)."""

    @abc.abstractmethod
    async def register_node(self, record: NodeRecord, previous: NodeRecord | None) -> NodeRecord:
        """Grant a lease and write ``record`` under it (returned with ``lease_id`` set).

        ``previous`` is the record the caller saw (or None): the write fails with StoreConflict
        if the stored record changed since. The previous incarnation's keys and lease go away.
        """

    @abc.abstractmethod
    async def refresh_lease(self, record: NodeRecord) -> int:
        """Refresh the node's lease; returns the TTL left, 0 when the lease is gone."""

    @abc.abstractmethod
    async def put_status(self, record: NodeRecord, status: NodeStatus) -> None:
        """Write the node's status under its lease."""

    @abc.abstractmethod
    async def append_delta(self, record: NodeRecord, delta: Delta) -> bool:
        """Persist one delta batch; False when that seq was already written (a retry)."""

    @abc.abstractmethod
    async def write_snapshot(self, record: NodeRecord, gen: int, through_seq: int,
                             hashes: HashArray, replace: bool,
                             offloaded: HashArray | None = None) -> None:
        """Persist the node's whole set (device ``hashes`` and the ``offloaded`` tier) as
        generation ``gen`` and drop older deltas/snapshots."""

    @abc.abstractmethod
    async def delete_node(self, record: NodeRecord) -> None:
        """Delete every key of the node and revoke its lease."""

    @abc.abstractmethod
    async def load(self) -> LoadResult:
        """Everything stored, as events in apply order, with the revision to watch from."""

    @abc.abstractmethod
    def watch(self, revision: int) -> AsyncIterator[list[StoreEvent]]:
        """Events after ``revision`` in order. Raises WatchRestart when it must be re-listed."""

    def bytes_written(self) -> int:
        """Bytes of values and keys written so far (for the bench)."""
        return 0

    def hubs(self) -> HubDirectory | None:
        """Where registry replicas find one another's RouteShare hubs (None: this store is
        private to one process, so there are no peers)."""
        return None


# Packed encodings shared by the stores (memory store keeps them to count bytes honestly).
#
# Version 1 values (KVS1/KVD1) carry the device tier only. Version 2 (KVS2/KVD2) adds the
# offloaded tier; they are written only when a value has offloaded blocks, so a fleet without
# offloading writes exactly the bytes it always did, and every reader decodes both versions
# (a version 1 value has an empty offloaded tier).

_SNAP_HDR = struct.Struct("<4sQQIIB")  # magic, gen, through_seq, chunk, chunks, replace
_SNAP2_HDR = struct.Struct("<4sQQIIBB")  # ... + tier (0 device, 1 offloaded)
_DELTA_HDR = struct.Struct("<4sQQBI")  # magic, base_gen, seq, cleared, n_stored
_DELTA2_HDR = struct.Struct("<4sQQBIII")  # ... + n_removed, n_stored_offloaded
SNAP_MAGIC = b"KVS1"
SNAP2_MAGIC = b"KVS2"
DELTA_MAGIC = b"KVD1"
DELTA2_MAGIC = b"KVD2"


def as_hashes(values: Sequence[int] | HashArray) -> HashArray:
    """uint64 array of hashes (from a protobuf repeated field or an array)."""
    return np.asarray(values, dtype=np.uint64)


def _le(a: HashArray) -> bytes:
    return a.astype("<u8", copy=False).tobytes()


def encode_delta(delta: Delta) -> bytes:
    """Header + stored + removed (+ stored_offloaded + removed_offloaded) as little-endian
    uint64; version 1 when the offloaded tier is untouched."""
    if not delta.has_offloaded:
        hdr = _DELTA_HDR.pack(DELTA_MAGIC, delta.base_gen, delta.seq, int(delta.cleared),
                              delta.stored.size)
        return hdr + _le(delta.stored) + _le(delta.removed)
    hdr = _DELTA2_HDR.pack(DELTA2_MAGIC, delta.base_gen, delta.seq, int(delta.cleared),
                           delta.stored.size, delta.removed.size, delta.stored_offloaded.size)
    return (hdr + _le(delta.stored) + _le(delta.removed) + _le(delta.stored_offloaded)
            + _le(delta.removed_offloaded))


def decode_delta(data: bytes) -> Delta:
    """Inverse of :func:`encode_delta` (either version); ValueError on a malformed value."""
    if data[:4] == DELTA2_MAGIC and len(data) >= _DELTA2_HDR.size:
        _, base_gen, seq, cleared, n_st, n_rm, n_so = _DELTA2_HDR.unpack_from(data)
        body = np.frombuffer(data, dtype="<u8", offset=_DELTA2_HDR.size).astype(np.uint64)
        if n_st + n_rm + n_so > body.size:
            raise ValueError("not a kvroute delta value")
        a, b, c = n_st, n_st + n_rm, n_st + n_rm + n_so
        return Delta(seq=seq, base_gen=base_gen, cleared=bool(cleared), stored=body[:a],
                     removed=body[a:b], stored_offloaded=body[b:c], removed_offloaded=body[c:])
    if len(data) < _DELTA_HDR.size:
        raise ValueError("delta value too short")
    magic, base_gen, seq, cleared, n_stored = _DELTA_HDR.unpack_from(data)
    body = np.frombuffer(data, dtype="<u8", offset=_DELTA_HDR.size).astype(np.uint64)
    if magic != DELTA_MAGIC or n_stored > body.size:
        raise ValueError("not a kvroute delta value")
    return Delta(seq=seq, base_gen=base_gen, cleared=bool(cleared), stored=body[:n_stored],
                 removed=body[n_stored:])


@dataclass(frozen=True)
class SnapChunk:
    """One snapshot key's content."""

    gen: int
    through_seq: int
    chunk: int
    chunks: int
    replace: bool
    hashes: HashArray
    tier: int = 0
    """0 = device blocks, 1 = offloaded blocks (version 1 values are always 0)."""


def encode_snapshot(gen: int, through_seq: int, hashes: HashArray, replace: bool,
                    chunk_bytes: int, offloaded: HashArray | None = None) -> list[bytes]:
    """Split a snapshot into values of at most ``chunk_bytes`` (header included): the device
    chunks first, then the offloaded ones (version 2, each chunk tagged with its tier)."""
    if offloaded is None or not offloaded.size:
        per = max(1, (chunk_bytes - _SNAP_HDR.size) // 8)
        arr = hashes.astype("<u8", copy=False)
        parts = [arr[i:i + per] for i in range(0, arr.size, per)] or [arr[:0]]
        return [_SNAP_HDR.pack(SNAP_MAGIC, gen, through_seq, i, len(parts), int(replace))
                + p.tobytes() for i, p in enumerate(parts)]
    per = max(1, (chunk_bytes - _SNAP2_HDR.size) // 8)
    tagged: list[tuple[int, HashArray]] = []
    for tier, a in ((0, hashes), (1, offloaded)):
        arr = a.astype("<u8", copy=False)
        tagged += [(tier, arr[i:i + per]) for i in range(0, arr.size, per)]
    return [_SNAP2_HDR.pack(SNAP2_MAGIC, gen, through_seq, i, len(tagged), int(replace), t)
            + p.tobytes() for i, (t, p) in enumerate(tagged)]


def decode_snapshot(data: bytes) -> SnapChunk:
    """Inverse of one :func:`encode_snapshot` value; ValueError on a malformed value."""
    if data[:4] == SNAP2_MAGIC and len(data) >= _SNAP2_HDR.size:
        _, gen, through, chunk, chunks, replace, tier = _SNAP2_HDR.unpack_from(data)
        if chunk >= chunks or tier > 1:
            raise ValueError("not a kvroute snapshot value")
        body = np.frombuffer(data, dtype="<u8", offset=_SNAP2_HDR.size).astype(np.uint64)
        return SnapChunk(gen, through, chunk, chunks, bool(replace), body, tier)
    if len(data) < _SNAP_HDR.size:
        raise ValueError("snapshot value too short")
    magic, gen, through, chunk, chunks, replace = _SNAP_HDR.unpack_from(data)
    if magic != SNAP_MAGIC or chunk >= chunks:
        raise ValueError("not a kvroute snapshot value")
    body = np.frombuffer(data, dtype="<u8", offset=_SNAP_HDR.size).astype(np.uint64)
    return SnapChunk(gen, through, chunk, chunks, bool(replace), body)


def join_chunks(chunks: Sequence[SnapChunk]) -> tuple[HashArray, HashArray]:
    """(device, offloaded) hashes of a complete snapshot's chunks, in chunk order."""
    dev = [c.hashes for c in chunks if c.tier == 0]
    off = [c.hashes for c in chunks if c.tier == 1]
    return (np.concatenate(dev) if dev else _NONE.copy(),
            np.concatenate(off) if off else _NONE.copy())
