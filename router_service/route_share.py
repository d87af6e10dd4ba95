"""The shared view of load across router replicas (issue 19).

With N router (or gateway) replicas behind a Service, each replica counts only the requests it
routed: it sees about 1/N of every node's in-flight load and queued prefill, and a follow-up turn
handled by replica B does not know that replica A just sent the first turn to node 3. Every
replica therefore publishes a :class:`RouteDelta` per routed and per completed request, a
transport (the registry's ``RouteShare.Exchange`` stream in production, a delayed in-process bus
in ``kvroute bench --mode sim --routers N``) delivers every other replica's deltas, and the
routing core applies them:

- others' in-flight requests per node (:class:`RemoteLoad`, added to the replica's own counts),
- others' uncached prefill on the node's queued-prefill estimate (the replica's
  :class:`~router_service.load.LoadTracker`: one queue per node, whoever routed into it),
- others' recent routes (kv_aware's ``recent_routes`` overlap source, through
  :meth:`~router_service.policies.plugins.scheduler.SchedulingPolicy.observe_remote`).

Staleness is measured per applied delta (receiver clock minus the sender's timestamp). A replica
whose transport is down, or that has heard nothing for ``timeout_s`` (the hub sends keepalives),
drops the remote part and decides on its own counts; decisions then say so in ``reason`` and the
``kvroute_router_shared_view_connected`` gauge reads 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router_service.inflight import InflightTable
from router_service.load import LoadTracker
from router_service.metrics import RouterMetrics
from router_service.policies.factory import PolicySet

COINCIDENCE_WEIGHT = 0.05
"""Weight of each peer decision in :attr:`SharedView.coincidence` (about the last 20 count)."""


@dataclass(frozen=True, slots=True)
class RouteDelta:
    """One replica's routing event, as shared with the other replicas."""

    replica_id: str
    """The replica that routed (or completed) the request."""
    request_id: str
    node_id: str = ""
    """Chosen node ("" for a completion)."""
    uncached_tokens: int = 0
    """Prefill the request adds on the node (prompt tokens not expected from cache)."""
    cached_tokens: int = 0
    """Prompt tokens expected from the node's cache."""
    block_hashes: Sequence[int] = ()
    """A bounded prefix of the request's block hashes (for recent-routes overlap)."""
    sent_at: float = 0.0
    """Sender's clock when published (wall time in production, model time in the sim)."""
    completed: bool = False
    """True for a completion (release), False for a routed request."""


@dataclass(slots=True)
class _Remote:
    node_id: str
    started: float
    """When this replica heard of it."""


class RemoteLoad:
    """Other replicas' in-flight requests per node, with the same expiry as the local ones."""

    def __init__(self, clock: Callable[[], float], inflight_timeout_s: float = 300.0,
                 max_tracked: int = 1_000_000) -> None:
        self._clock = clock
        self._requests: InflightTable[tuple[str, str], _Remote] = InflightTable(
            inflight_timeout_s, max_tracked)
        self._by_id: dict[str, tuple[str, str]] = {}
        self.expired_total = 0

    def start(self, replica_id: str, request_id: str, node_id: str) -> None:
        """Count another replica's routed request on ``node_id``."""
        now = self._clock()
        self.expire(now)
        key = (replica_id, request_id)
        evicted = self._requests.add(key, _Remote(node_id, now))
        self._unindex(evicted)
        self.expired_total += len(evicted)
        self._by_id[request_id] = key

    def complete(self, replica_id: str | None, request_id: str) -> str | None:
        """Release a remote request (any replica's when ``replica_id`` is None); its node."""
        key = (replica_id, request_id) if replica_id is not None else self._by_id.get(request_id)
        rec = None if key is None else self._requests.release(key)
        if key is None or rec is None:
            return None
        self._unindex([key])
        return rec.node_id

    def forget(self, replica_id: str) -> int:
        """Drop every in-flight request of ``replica_id`` (its completions can no longer
        arrive: its stream or its hub's relay ended); how many."""
        keys = [k for k in self._requests if k[0] == replica_id]
        for key in keys:
            self._requests.release(key)
        self._unindex(keys)
        return len(keys)

    def _unindex(self, keys: list[tuple[str, str]]) -> None:
        by_id = self._by_id
        for key in keys:
            if by_id.get(key[1]) == key:
                del by_id[key[1]]

    def expire(self, now: float | None = None) -> int:
        """Release remote requests older than the timeout (their completion was lost)."""
        keys = self._requests.expire(self._clock() if now is None else now)
        self._unindex(keys)
        self.expired_total += len(keys)
        return len(keys)

    def inflight(self, node_id: str) -> int:
        """Other replicas' requests in flight on ``node_id``."""
        return self._requests.count(node_id)

    @property
    def total(self) -> int:
        """Other replicas' requests in flight on all nodes."""
        return len(self._requests)

    def clear(self) -> None:
        """Forget every remote request (the shared view was lost)."""
        self._requests.clear()
        self._by_id.clear()


class SharedView:
    """One replica's end of the shared view: what it publishes and what it heard.

    ``publish`` is the transport's send function (non-blocking). The transport calls
    :meth:`set_connected` when its link goes up or down and feeds received deltas to
    :meth:`router_service.core.RouterCore.apply_remote` (which calls :meth:`apply`).
    """

    def __init__(self, replica_id: str, publish: Callable[[RouteDelta], None],
                 clock: Callable[[], float], *, inflight_timeout_s: float = 300.0,
                 max_blocks: int = 64, timeout_s: float = 5.0,
                 max_tracked: int = 1_000_000, peer_window_s: float = 30.0,
                 burst_window_s: float = 0.01, burst_coincidence: float = 0.5,
                 burst_stagger_s: float = 0.0) -> None:
        if not replica_id:
            raise ValueError("replica_id must not be empty")
        if min(max_blocks, burst_window_s, burst_coincidence, burst_stagger_s) < 0 \
                or timeout_s <= 0:
            raise ValueError("max_blocks, burst_window_s, burst_coincidence and burst_stagger_s "
                             "must be >= 0, timeout_s > 0")
        self.replica_id = replica_id
        self.publish = publish
        self.clock = clock
        self.max_blocks = max_blocks
        self.timeout_s = timeout_s
        self.remote = RemoteLoad(clock, inflight_timeout_s, max_tracked)
        self.peer_window_s = peer_window_s
        """A replica counts as a live peer while it routed within this many seconds."""
        self._peers: dict[str, float] = {}
        self.burst_window_s = burst_window_s
        """Own decisions closer than this mean a burst (:meth:`in_burst`)."""
        self._last_routed = float("-inf")
        self.burst_coincidence = burst_coincidence
        """Side-by-side share (:attr:`coincidence`) from which every decision counts as in a
        burst (above 1: never)."""
        self.burst_stagger_s = burst_stagger_s
        """In a burst, the replica ranked r waits r x this before deciding (0 = off)."""
        self.staggered_total = 0
        self._own_times: deque[float] = deque(maxlen=256)
        self.coincidence = 0.0
        """Share of the peers' recent decisions made within ``burst_window_s`` of one of this
        replica's (exponentially weighted over about the last 20): how often the replicas
        decide side by side, blind to one another."""
        self._connected = False
        self._why = "not connected yet"
        self._last_heard = float("-inf")
        self.applied_total = 0
        self.forgotten_total = 0
        """Remote in-flight requests dropped because their replica's path broke."""
        self.lost_total = 0
        """Times the shared view was lost (remote state dropped)."""
        self.last_staleness_s = 0.0
        self.max_staleness_s = 0.0
        self.on_staleness: Callable[[float], None] | None = None
        """Called with each measured staleness (``kvroute bench share`` records them)."""

    # -- link state ------------------------------------------------------------------------
    def set_connected(self, up: bool, why: str = "") -> None:
        """The transport's link went up (remote state starts empty) or down (dropped)."""
        if up:
            if not self._connected:
                self.remote.clear()
            self._connected = True
            self._last_heard = self.clock()
            self._why = ""
        else:
            if self._connected:
                self.lost_total += 1
            self._connected = False
            self._why = why or "link down"
            self.remote.clear()
            self._peers.clear()

    def heard(self, sent_at: float | None = None) -> None:
        """Something (a delta or a keepalive) arrived; ``sent_at`` measures staleness."""
        now = self.clock()
        self._last_heard = now
        if sent_at is not None:
            lag = max(0.0, now - sent_at)
            self.last_staleness_s = lag
            self.max_staleness_s = max(self.max_staleness_s, lag)
            if self.on_staleness is not None:
                self.on_staleness(lag)

    def saw_peer(self, replica_id: str) -> None:
        """Another replica routed a request (counted by :meth:`peers`)."""
        self._peers[replica_id] = self.clock()

    def peers(self) -> int:
        """Other replicas that routed within ``peer_window_s`` (0 while the view is lost):
        how many routers decide next to this one without seeing its latest decisions."""
        if not self._peers:
            return 0
        limit = self.clock() - self.peer_window_s
        for rid in [r for r, t in self._peers.items() if t < limit]:
            del self._peers[rid]
        return len(self._peers)

    def in_burst(self) -> bool:
        """True when this replica routed another request within ``burst_window_s`` (requests
        are arriving faster than the shared view can tell the replicas about one another's),
        or when traffic comes in bursts that reach every replica at once: at least
        ``burst_coincidence`` of the peers' recent decisions were made side by side with one
        of this replica's (:attr:`coincidence`). A burst's first request looks like a lone
        one to the replica that gets it; only the traffic's history tells them apart."""
        return (self.clock() - self._last_routed <= self.burst_window_s
                or self.coincidence >= self.burst_coincidence)

    def replica_slot(self) -> tuple[int, int]:
        """(replicas deciding side by side, this one's rank) for kv_aware's picker, which then
        spreads a burst over them; (1, 0) unless the view is live, this is a burst next to live
        peers and the replicas do not take turns (staggered, each sees the lower ranks'
        decisions instead)."""
        if not self.live() or not self.in_burst() or self.burst_stagger_s:
            return 1, 0
        peers = self.peers()
        return (peers + 1, self.rank()) if peers else (1, 0)

    def stagger_wait(self) -> float:
        """Seconds to wait before deciding: in a burst next to live peers, with staggering on,
        ``rank() x burst_stagger_s`` (rank 0 decides at once, rank 1 once rank 0's decisions of
        the same instant have reached it, ...); 0 otherwise."""
        if self.burst_stagger_s <= 0 or not self.live() or not self.in_burst():
            return 0.0
        if not self.peers():
            return 0.0
        wait = self.rank() * self.burst_stagger_s
        if wait > 0:
            self.staggered_total += 1
        return wait

    def _side_by_side(self, sent_at: float) -> None:
        """Update :attr:`coincidence` with a peer's decision made at ``sent_at``."""
        w = self.burst_window_s
        hit = 0.0
        for t in reversed(self._own_times):  # newest first; stop once they are too old
            if t < sent_at - w:
                break
            if t <= sent_at + w:
                hit = 1.0
                break
        self.coincidence += COINCIDENCE_WEIGHT * (hit - self.coincidence)

    def rank(self) -> int:
        """This replica's place among itself and its live peers, by sorted replica id (every
        replica computes the same order, so each gets its own place without coordination)."""
        return sorted([self.replica_id, *self._peers]).index(self.replica_id)

    def live(self) -> bool:
        """True while the shared view is usable (connected, heard within ``timeout_s``)."""
        if not self._connected:
            return False
        if self.clock() - self._last_heard > self.timeout_s:
            self.set_connected(False, f"nothing heard for over {self.timeout_s:g} s")
            return False
        return True

    @property
    def why_not(self) -> str:
        """Why the view is not live ("" when it is)."""
        return "" if self._connected else self._why

    # -- incoming ----------------------------------------------------------------------------
    def forget(self, replicas: Sequence[str]) -> int:
        """The hub says these replicas' completions can no longer reach this one (their
        stream or their hub's relay ended): drop their in-flight requests and stop counting
        them as peers. Returns the requests dropped."""
        dropped = 0
        for rid in replicas:
            if rid == self.replica_id:
                continue
            dropped += self.remote.forget(rid)
            self._peers.pop(rid, None)
        self.forgotten_total += dropped
        return dropped

    def apply(self, delta: RouteDelta, tracker: LoadTracker, policies: PolicySet,
              metrics: RouterMetrics | None = None) -> None:
        """Apply another replica's routing delta (this replica's own echoes are ignored).

        A routed request counts in flight on its node, adds its uncached prefill to the node's
        queued-prefill estimate in ``tracker`` and is remembered by the ``policies`` that learn
        from routes (``observe_remote``); a completion releases it (or this replica's own
        request when it was completed through another replica).
        """
        if delta.replica_id == self.replica_id:
            return
        self.heard(delta.sent_at)
        if not self.live():
            return
        self.applied_total += 1
        if metrics is not None:
            metrics.shared_view_staleness.observe(self.last_staleness_s)
        if delta.completed:
            if self.remote.complete(None, delta.request_id) is None:
                tracker.complete(delta.request_id)
            return
        self.remote.start(delta.replica_id, delta.request_id, delta.node_id)
        self.saw_peer(delta.replica_id)
        self._side_by_side(delta.sent_at)
        tracker.add_prefill(delta.node_id, delta.uncached_tokens)
        if delta.block_hashes:
            for name in policies.names:
                observe = getattr(policies.get(name), "observe_remote", None)
                if observe is not None:
                    observe(delta.block_hashes, delta.node_id)

    # -- outgoing ----------------------------------------------------------------------------
    def routed(self, request_id: str, node_id: str, uncached: int, cached: int,
               block_hashes: Sequence[int]) -> None:
        """Publish one of this replica's decisions."""
        blocks = tuple(block_hashes[: self.max_blocks]) if self.max_blocks else ()
        self._last_routed = self.clock()
        self._own_times.append(self._last_routed)
        self.publish(RouteDelta(self.replica_id, request_id, node_id, uncached, cached, blocks,
                                self.clock()))

    def completed(self, request_id: str) -> None:
        """Publish a completion (of this replica's request, or another's released here)."""
        self.publish(RouteDelta(self.replica_id, request_id, sent_at=self.clock(),
                                completed=True))
