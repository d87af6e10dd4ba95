"""A replica's view of one node: record, usage, delta position, health; and change fan-out."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from registry_service.store.base import HashArray, NodeRecord, NodeStatus


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


@dataclass
class LiveNode:
    """What this replica knows about one live node."""

    record: NodeRecord
    slot: int
    status: NodeStatus = field(default_factory=NodeStatus)
    gen: int = 0
    """Snapshot generation the node's deltas apply on (a Resync or compaction bumps it)."""
    applied_seq: int = 0
    """Last delta_seq applied on ``gen``."""
    deltas_since_snapshot: int = 0
    lease_refreshed_mono: float = field(default_factory=time.monotonic)
    status_written_mono: float = 0.0
    seen_unix_ms: int = 0
    """Last heartbeat received by this replica (even one whose etcd write then failed)."""
    refreshed_here_mono: float = 0.0
    """When this replica last refreshed the lease itself (0 = never)."""
    trusted_until_ms: int = 0
    """Until then the node counts as healthy although this replica has not heard a heartbeat
    in time: set when a (re)started replica loads a node whose lease is alive in etcd. A node
    that really stopped loses its lease within the TTL and etcd deletes it, so "not heard from
    yet" never turns into "unhealthy" for a node that is still heartbeating elsewhere or is
    about to reconnect. Also set, for one late window, after this replica's own event loop
    stalled (:meth:`ReplicaView.forgive_stall`). A heartbeat clears it."""
    beating: int = 0
    """Heartbeats of this node being processed now (e.g. waiting on a stalled etcd): the
    agent is alive and waiting for us, so the node is not late."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def node_id(self) -> str:
        """Node id."""
        return self.record.node_id

    def capacity(self) -> int:
        """Capacity in blocks (latest heartbeat's value if it reported one)."""
        return self.status.capacity_blocks or self.record.capacity_blocks

    def usage(self) -> float:
        """used / capacity, clamped to 0..1."""
        cap = self.capacity()
        return min(1.0, self.status.used_blocks / cap) if cap else 0.0

    def heartbeat_ms(self) -> int:
        """Time of the latest heartbeat seen (registration counts as one)."""
        return max(self.status.heartbeat_unix_ms, self.record.registered_unix_ms,
                   self.seen_unix_ms)

    def healthy(self, late_after_s: float, at_ms: int | None = None) -> bool:
        """Heartbeats on time (as seen by this replica, directly or through etcd), or a lease
        this replica found alive when it loaded the node and has not seen expire yet."""
        if self.beating:
            return True
        at = now_ms() if at_ms is None else at_ms
        return at - self.heartbeat_ms() <= late_after_s * 1000.0 or at <= self.trusted_until_ms

    def lease_left_s(self) -> float:
        """Seconds left on the lease as of the last refresh this replica knows of."""
        since_refresh = time.monotonic() - self.lease_refreshed_mono
        since_beat = (now_ms() - self.heartbeat_ms()) / 1000.0
        return max(0.0, self.record.lease_ttl_s - min(since_refresh, max(0.0, since_beat)))


@dataclass(frozen=True)
class Change:
    """One change of the replica's view, fanned out to WatchNodes/WatchPlacement streams.

    ``kind`` is ``upsert`` (node added or its record/usage changed), ``removed`` or ``blocks``;
    ``overflow`` and ``closing`` end a subscription (reader too slow; replica shutting down).
    """

    kind: str
    node_id: str
    added: bool = False
    cleared: bool = False
    stored: HashArray | None = None
    removed: HashArray | None = None
    stored_offloaded: HashArray | None = None
    """Blocks now held on the node's offloaded (lower) tier."""
    removed_offloaded: HashArray | None = None
    """Blocks no longer held on the node's offloaded tier."""


class Subscription:
    """A bounded queue of changes; ``overflowed`` when the reader fell too far behind."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[Change] = asyncio.Queue(size)
        self.overflowed = False


class Fanout:
    """Delivers every change to every subscriber; a slow subscriber is cut off, never waited on."""

    def __init__(self, queue_size: int) -> None:
        self._subs: set[Subscription] = set()
        self._size = queue_size

    def subscribe(self) -> Subscription:
        """A new subscription (call ``unsubscribe`` when done)."""
        sub = Subscription(self._size)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to ``sub``."""
        self._subs.discard(sub)

    def publish(self, change: Change) -> None:
        """Queue ``change`` for every subscriber."""
        for sub in list(self._subs):
            try:
                sub.queue.put_nowait(change)
            except asyncio.QueueFull:
                sub.overflowed = True
                self._subs.discard(sub)
                while not sub.queue.empty():  # the reader only needs to learn it was cut off
                    sub.queue.get_nowait()
                sub.queue.put_nowait(Change("overflow", ""))

    def close_all(self) -> None:
        """End every subscription (the replica is shutting down): each reader gets a
        ``closing`` change after the ones already queued, and no more changes."""
        subs, self._subs = self._subs, set()
        for sub in subs:
            try:
                sub.queue.put_nowait(Change("closing", ""))
            except asyncio.QueueFull:
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(Change("closing", ""))

    @property
    def subscribers(self) -> int:
        """Open subscriptions."""
        return len(self._subs)
