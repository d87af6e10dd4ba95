"""Requests in flight per node: the one table behind this router's own counts
(:class:`~router_service.load.LoadTracker`) and the other replicas' counts
(:class:`~router_service.route_share.RemoteLoad`).

Entries are kept in start order, so the oldest leave first, both when the size bound is reached
and when they outlive the timeout (their completion was lost). Pure data on the caller's clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from typing import Generic, Protocol, TypeVar


class Started(Protocol):
    """What the table reads from an entry."""

    node_id: str
    started: float


K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=Started)


class InflightTable(Generic[K, E]):
    """key -> entry in start order, and the number of entries per node."""

    def __init__(self, timeout_s: float, max_tracked: int) -> None:
        if timeout_s <= 0 or max_tracked < 1:
            raise ValueError("timeout_s must be > 0 and max_tracked >= 1")
        self.timeout_s = timeout_s
        self.max_tracked = max_tracked
        self._entries: OrderedDict[K, E] = OrderedDict()
        self._count: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """Every key, oldest first (over a copy: the table may change meanwhile)."""
        return iter(list(self._entries))

    def get(self, key: K) -> E | None:
        """The entry of ``key``, or None."""
        return self._entries.get(key)

    def count(self, node_id: str) -> int:
        """Entries on ``node_id``."""
        return self._count.get(node_id, 0)

    def counts(self) -> Mapping[str, int]:
        """Entries per node with any (a live read-only view)."""
        return self._count

    def add(self, key: K, entry: E) -> list[K]:
        """Count ``entry`` under ``key`` (a key already counted is released first); returns
        the keys released, oldest first, to stay within ``max_tracked``."""
        if key in self._entries:
            self.release(key)
        evicted: list[K] = []
        while len(self._entries) >= self.max_tracked:
            oldest = next(iter(self._entries))
            self.release(oldest)
            evicted.append(oldest)
        self._entries[key] = entry
        self._count[entry.node_id] = self._count.get(entry.node_id, 0) + 1
        return evicted

    def release(self, key: K) -> E | None:
        """Stop counting ``key``; its entry, or None if it was not counted."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        left = self._count.get(entry.node_id, 0) - 1
        if left > 0:
            self._count[entry.node_id] = left
        else:
            self._count.pop(entry.node_id, None)
        return entry

    def expire(self, now: float) -> list[K]:
        """Release the entries started more than ``timeout_s`` before ``now``; their keys."""
        limit = now - self.timeout_s
        out: list[K] = []
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.started > limit:
                break
            self.release(key)
            out.append(key)
        return out

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._count.clear()
