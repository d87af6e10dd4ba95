"""Net block deltas between heartbeats, with acknowledgement and sequence numbers.

Changes accumulate in a *pending* delta. A heartbeat takes it as the *in-flight* batch with the
next ``delta_seq``; the batch is dropped only when the registry acknowledges it. If the call fails
the same batch (same seq) is sent again, which the registry acknowledges without applying twice
(registry.proto). Changes made while a batch is in flight go to a fresh pending delta and travel
with the next seq. A beat without changes carries the last acknowledged seq (a repeat: nothing
to apply). After RegisterNode or Resync the numbering restarts at 1.

Net semantics (the registry applies ``cleared``, then ``removed``, then ``stored``, as sets):
storing ``h`` cancels a pending removal of ``h``; removing ``h`` cancels a pending store of it;
``cleared`` forgets everything pending before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class DeltaBatch:
    """One heartbeat's worth of changes."""

    seq: int
    """``delta_seq`` of the batch (the last acknowledged seq when it carries no change)."""
    stored: list[int] = field(default_factory=list)
    """Canonical hashes cached since the previous batch."""
    removed: list[int] = field(default_factory=list)
    """Canonical hashes evicted since the previous batch."""
    cleared: bool = False
    """The whole cache was dropped before ``stored``."""
    stored_offloaded: list[int] = field(default_factory=list)
    """Canonical hashes now held on an offloading medium (the lower tier)."""
    removed_offloaded: list[int] = field(default_factory=list)
    """Canonical hashes no longer held on any offloading medium."""

    @property
    def empty(self) -> bool:
        """True when the batch carries no change."""
        return not (self.stored or self.removed or self.cleared or self.stored_offloaded
                    or self.removed_offloaded)


class DeltaLog:
    """Pending and in-flight deltas of one node (single-threaded: the agent's event loop)."""

    def __init__(self, max_hashes_per_batch: int = 100_000) -> None:
        self._max = max_hashes_per_batch
        self._stored: dict[int, None] = {}
        self._removed: dict[int, None] = {}
        self._stored_off: dict[int, None] = {}
        self._removed_off: dict[int, None] = {}
        self._cleared = False
        self._inflight: DeltaBatch | None = None
        self._last_acked = 0

    # --- recording -----------------------------------------------------------------------
    def stored(self, h: int) -> None:
        """A canonical block is now cached."""
        self._removed.pop(h, None)
        self._stored[h] = None

    def removed(self, h: int) -> None:
        """A canonical block is no longer cached."""
        self._stored.pop(h, None)
        self._removed[h] = None

    def stored_offloaded(self, h: int) -> None:
        """A canonical block is now held on an offloading medium."""
        self._removed_off.pop(h, None)
        self._stored_off[h] = None

    def removed_offloaded(self, h: int) -> None:
        """A canonical block is no longer held on any offloading medium."""
        self._stored_off.pop(h, None)
        self._removed_off[h] = None

    def cleared(self) -> None:
        """The node's whole cache (every tier) was dropped."""
        self._stored.clear()
        self._removed.clear()
        self._stored_off.clear()
        self._removed_off.clear()
        self._cleared = True

    # --- sending -------------------------------------------------------------------------
    @property
    def last_acked(self) -> int:
        """delta_seq of the last acknowledged batch (0 right after a reset)."""
        return self._last_acked

    def has_pending(self) -> bool:
        """True when changes wait for a heartbeat (beyond the in-flight batch)."""
        return bool(self._stored or self._removed or self._cleared or self._stored_off
                    or self._removed_off)

    def pending_count(self) -> int:
        """Hashes waiting (pending, not in flight)."""
        return (len(self._stored) + len(self._removed) + len(self._stored_off)
                + len(self._removed_off))

    def take(self) -> DeltaBatch:
        """The batch to send now: the unacknowledged in-flight one, else the pending changes
        (at most ``max_hashes_per_batch`` hashes; the rest stays pending), else an empty beat."""
        if self._inflight is not None:
            return self._inflight
        if not self.has_pending():
            return DeltaBatch(seq=self._last_acked)
        removed = _pop_first(self._removed, self._max)
        stored = _pop_first(self._stored, self._max - len(removed))
        left = self._max - len(removed) - len(stored)
        removed_off = _pop_first(self._removed_off, left)
        stored_off = _pop_first(self._stored_off, left - len(removed_off))
        self._inflight = DeltaBatch(seq=self._last_acked + 1, stored=stored, removed=removed,
                                    cleared=self._cleared, stored_offloaded=stored_off,
                                    removed_offloaded=removed_off)
        self._cleared = False
        return self._inflight

    def ack(self, batch: DeltaBatch) -> None:
        """The registry applied (or already had) ``batch``."""
        if batch is self._inflight:
            self._last_acked = batch.seq
            self._inflight = None

    def reset(self, next_seq: int = 1) -> None:
        """Forget every pending and in-flight change (a Resync sent the full set); the next
        batch carries ``next_seq``."""
        self._stored.clear()
        self._removed.clear()
        self._stored_off.clear()
        self._removed_off.clear()
        self._cleared = False
        self._inflight = None
        self._last_acked = max(0, next_seq - 1)

    def renumber(self, next_seq: int) -> None:
        """Keep pending changes but number the next batch ``next_seq`` (after a Resync whose
        snapshot was taken with :meth:`reset`)."""
        if self._inflight is None:
            self._last_acked = max(0, next_seq - 1)


def _pop_first(d: dict[int, None], n: int) -> list[int]:
    if n <= 0:
        return []
    if len(d) <= n:
        out = list(d)
        d.clear()
        return out
    out = []
    for h in d:
        out.append(h)
        if len(out) == n:
            break
    for h in out:
        del d[h]
    return out
