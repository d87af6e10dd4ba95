"""In-flight requests per node and queued prefill work, on an injected clock.

:class:`LoadTracker` counts the requests this router sent to each node that have not completed.
A request leaves the count on ``Complete`` or, if that never comes (client crash, lost call),
after ``inflight_timeout_s`` — or sooner, at the deadline its caller gave (``deadline_s``: the
caller gives up after that long, so an abandoned request stops counting within seconds) — so
lost completions cannot leak load; such expirations are counted. It also estimates the
prefill work still queued on each node: every routed request adds its uncached prompt tokens,
and the estimate drains at ``prefill_tokens_per_s`` — this fills
``NodeView.pending_prefill_tokens`` (kv_aware's load cost in TTFT units).

The clock is a parameter (``time.monotonic`` in the server, simulated time in the bench), and
nothing here does I/O, so the bench runs the same code.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from router_service.inflight import InflightTable


@dataclass(slots=True)
class _Inflight:
    node_id: str
    started: float
    predicted_cached_tokens: int
    uncached_tokens: int = 0


class LoadTracker:
    """In-flight counts and pending-prefill estimates per node."""

    def __init__(self, clock: Callable[[], float], inflight_timeout_s: float = 300.0,
                 prefill_tokens_per_s: float = 16_000.0, max_tracked: int = 1_000_000) -> None:
        if inflight_timeout_s <= 0 or prefill_tokens_per_s <= 0 or max_tracked < 1:
            raise ValueError("inflight_timeout_s, prefill_tokens_per_s and max_tracked must be > 0")
        self._clock = clock
        self._rate = prefill_tokens_per_s
        self._requests: InflightTable[str, _Inflight] = InflightTable(inflight_timeout_s,
                                                                      max_tracked)
        self._pending: dict[str, tuple[float, float]] = {}  # node -> (tokens, as of time)
        self._deadlines: list[tuple[float, float, str]] = []  # (expires, started, request id)
        self._rates: dict[str, float] = {}  # node -> calibrated prefill tokens/s (issue 19)
        self.expired_total = 0
        """Requests released by the timeout (or the size bound) rather than by Complete."""

    # -- requests -------------------------------------------------------------------------
    def start(self, request_id: str, node_id: str, uncached_tokens: int,
              predicted_cached_tokens: int = 0, deadline_s: float | None = None) -> None:
        """Count a request routed to ``node_id`` and queue its uncached prefill there.

        A request id that is already in flight is released first (a retry routed again).
        ``deadline_s``: the caller gives up after this many seconds; without a Complete the
        request stops counting then (if sooner than the timeout).
        """
        now = self._clock()
        self.expire(now)
        evicted = self._requests.add(request_id,
                                     _Inflight(node_id, now, predicted_cached_tokens,
                                                       uncached_tokens))
        self.expired_total += len(evicted)
        if deadline_s is not None and 0 <= deadline_s < self._requests.timeout_s:
            heapq.heappush(self._deadlines, (now + deadline_s, now, request_id))
        if uncached_tokens > 0:
            self._pending[node_id] = (self.pending_prefill(node_id, now) + uncached_tokens, now)

    def add_prefill(self, node_id: str, uncached_tokens: int) -> None:
        """Queue prefill another router replica sent to ``node_id`` (one queue per node)."""
        if uncached_tokens > 0:
            now = self._clock()
            self._pending[node_id] = (self.pending_prefill(node_id, now) + uncached_tokens, now)

    def rate(self, node_id: str) -> float:
        """Prefill tokens/s the estimate drains at on ``node_id`` (calibrated or default)."""
        return self._rates.get(node_id, self._rate)

    def set_rate(self, node_id: str, tokens_per_s: float) -> None:
        """Use a calibrated prefill rate for ``node_id`` (0 = back to the default); the
        estimate so far is drained at the old rate first."""
        if tokens_per_s < 0:
            raise ValueError("tokens_per_s must be >= 0")
        if tokens_per_s == self._rates.get(node_id, 0.0):
            return
        now = self._clock()
        if node_id in self._pending:
            self._pending[node_id] = (self.pending_prefill(node_id, now), now)
        if tokens_per_s > 0:
            self._rates[node_id] = tokens_per_s
        else:
            self._rates.pop(node_id, None)

    def complete(self, request_id: str) -> str | None:
        """Release a request; returns its node id, or None if it was not in flight."""
        self.expire()
        rec = self._requests.release(request_id)
        return None if rec is None else rec.node_id

    def expire(self, now: float | None = None) -> int:
        """Release requests older than the timeout; returns how many (also counted)."""
        now = self._clock() if now is None else now
        n = 0
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, started, rid = heapq.heappop(dl)
            rec = self._requests.get(rid)
            if rec is not None and rec.started == started:  # not completed nor re-routed
                self._requests.release(rid)
                n += 1
        n += len(self._requests.expire(now))
        self.expired_total += n
        return n

    # -- views ----------------------------------------------------------------------------
    def inflight(self, node_id: str) -> int:
        """Requests in flight on ``node_id``."""
        return self._requests.count(node_id)

    def counts(self) -> Mapping[str, int]:
        """Requests in flight per node with any (a live read-only view; no expiry sweep)."""
        return self._requests.counts()

    def inflight_by_node(self) -> dict[str, int]:
        """Requests in flight per node (nodes with none omitted)."""
        self.expire()
        return dict(self._requests.counts())

    def snapshot(self, limit: int) -> list[tuple[str, str, int, int, float]]:
        """The newest ``limit`` requests in flight, oldest first: (request id, node id,
        uncached tokens, predicted cached tokens, seconds in flight) (a shared view's
        snapshot)."""
        now = self._clock()
        self.expire(now)
        out: list[tuple[str, str, int, int, float]] = []
        for rid in reversed(list(self._requests)):
            if len(out) >= limit:
                break
            rec = self._requests.get(rid)
            if rec is not None:
                out.append((rid, rec.node_id, rec.uncached_tokens, rec.predicted_cached_tokens,
                            max(0.0, now - rec.started)))
        out.reverse()
        return out

    @property
    def total_inflight(self) -> int:
        """Requests in flight on all nodes."""
        return len(self._requests)

    def pending_prefill(self, node_id: str, now: float | None = None) -> float:
        """Estimated uncached prompt tokens still to prefill on ``node_id`` (drains over time)."""
        rec = self._pending.get(node_id)
        if rec is None:
            return 0.0
        tokens, since = rec
        now = self._clock() if now is None else now
        left = tokens - self._rates.get(node_id, self._rate) * max(0.0, now - since)
        if left <= 0:
            del self._pending[node_id]
            return 0.0
        return left

    def pending_nodes(self) -> list[str]:
        """Nodes with a pending-prefill estimate."""
        return list(self._pending)

    def forget_node(self, node_id: str) -> None:
        """Drop the pending-prefill estimate of a node that left (its requests still expire)."""
        self._pending.pop(node_id, None)
        self._rates.pop(node_id, None)
