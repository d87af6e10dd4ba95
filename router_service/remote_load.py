"""Other router replicas' requests in flight per node (issue 19; see
:mod:`router_service.route_share`).

Each replica's contribution is rebuilt from its snapshots: on every (re)connect, and when a hub
asks, a replica sends its requests in flight, and :meth:`RemoteLoad.replace` puts them in place
of what was held for it, so a snapshot applied twice, or after a forget, never double counts.
Every delta carries its sender's *epoch* (raised on each reconnect and snapshot); a replica's
*floor* is the newest epoch a snapshot or forget of it came from, and anything older (a delta or
forget that came the long way round, through an old hub's relay) is ignored: the snapshot
already accounts for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from router_service.inflight import InflightTable

MAX_FLOORS = 100_000
"""Replicas whose epoch floor is remembered (the oldest are forgotten first)."""


@dataclass(slots=True)
class _Remote:
    node_id: str
    started: float
    """When this replica heard of it (minus its age, for a snapshot's)."""


class RemoteLoad:
    """Other replicas' in-flight requests per node, with the same expiry as the local ones."""

    def __init__(self, clock: Callable[[], float], inflight_timeout_s: float = 300.0,
                 max_tracked: int = 1_000_000) -> None:
        self._clock = clock
        self._timeout_s = inflight_timeout_s
        self._requests: InflightTable[tuple[str, str], _Remote] = InflightTable(
            inflight_timeout_s, max_tracked)
        self._by_id: dict[str, tuple[str, str]] = {}
        self._by_replica: dict[str, set[str]] = {}
        """Request ids held per replica: a join, forget or snapshot of one replica touches
        only its own requests (not every remote request)."""
        self._floors: OrderedDict[str, int] = OrderedDict()
        self.expired_total = 0
        self.stale_total = 0
        """Deltas, snapshots and forgets ignored: older than their replica's floor."""

    # -- epochs ----------------------------------------------------------------------------
    def floor(self, replica_id: str) -> int:
        """The newest epoch a snapshot or forget of ``replica_id`` came from (0: none)."""
        return self._floors.get(replica_id, 0)

    def current(self, replica_id: str, epoch: int) -> bool:
        """False (and counted) when ``epoch`` is older than the replica's floor; 0 = unknown,
        always current (a sender that does not give epochs)."""
        if epoch and epoch < self._floors.get(replica_id, 0):
            self.stale_total += 1
            return False
        return True

    def _raise_floor(self, replica_id: str, epoch: int) -> None:
        floors = self._floors
        if epoch > floors.get(replica_id, 0):
            floors[replica_id] = epoch
            floors.move_to_end(replica_id)
            while len(floors) > MAX_FLOORS:
                floors.popitem(last=False)

    # -- requests --------------------------------------------------------------------------
    def start(self, replica_id: str, request_id: str, node_id: str, age_s: float = 0.0) -> None:
        """Count another replica's routed request on ``node_id`` (in flight ``age_s`` already:
        a snapshot's request expires when the sender's own count does)."""
        now = self._clock()
        self.expire(now)
        key = (replica_id, request_id)
        age = min(max(0.0, age_s), self._timeout_s)
        evicted = self._requests.add(key, _Remote(node_id, now - age))
        self._unindex(evicted)
        self.expired_total += len(evicted)
        self._by_id[request_id] = key
        self._by_replica.setdefault(replica_id, set()).add(request_id)

    def complete(self, replica_id: str | None, request_id: str) -> str | None:
        """Release a remote request (any replica's when ``replica_id`` is None); its node."""
        key = (replica_id, request_id) if replica_id is not None else self._by_id.get(request_id)
        rec = None if key is None else self._requests.release(key)
        if key is None or rec is None:
            return None
        self._unindex([key])
        return rec.node_id

    def forget(self, replica_id: str, epoch: int = 0) -> int:
        """Drop every in-flight request of ``replica_id`` (its completions can no longer
        arrive: its stream or its hub's relay ended, as of its ``epoch``); how many. Ignored
        (-1) when the replica has re-announced itself from a newer epoch since."""
        if not self.current(replica_id, epoch):
            return -1
        if epoch:  # what it sent on the broken path up to then is superseded
            self._raise_floor(replica_id, epoch + 1)
        return self._drop(replica_id)

    def replace(self, replica_id: str, epoch: int) -> int | None:
        """A snapshot of ``replica_id`` from ``epoch`` starts: drop what is held for it (its
        parts then :meth:`start` their requests); the number dropped, or None when the
        snapshot is older than the floor (ignore its parts)."""
        if not self.current(replica_id, epoch):
            return None
        self._raise_floor(replica_id, epoch)
        return self._drop(replica_id)

    def _drop(self, replica_id: str) -> int:
        keys = [(replica_id, i) for i in self._by_replica.get(replica_id, ())]
        for key in keys:
            self._requests.release(key)
        self._unindex(keys)
        return len(keys)

    def _unindex(self, keys: list[tuple[str, str]]) -> None:
        by_id, by_replica = self._by_id, self._by_replica
        for key in keys:
            if by_id.get(key[1]) == key:
                del by_id[key[1]]
            ids = by_replica.get(key[0])
            if ids is not None:
                ids.discard(key[1])
                if not ids:
                    del by_replica[key[0]]

    def expire(self, now: float | None = None) -> int:
        """Release remote requests older than the timeout (their completion was lost)."""
        keys = self._requests.expire(self._clock() if now is None else now)
        self._unindex(keys)
        self.expired_total += len(keys)
        return len(keys)

    def inflight(self, node_id: str) -> int:
        """Other replicas' requests in flight on ``node_id``."""
        return self._requests.count(node_id)

    def of(self, replica_id: str, node_id: str | None = None) -> int:
        """Requests of ``replica_id`` in flight (on ``node_id`` when given: a scan of that
        replica's requests, for tests and logs)."""
        ids = self._by_replica.get(replica_id, ())
        if node_id is None:
            return len(ids)
        reqs = self._requests
        return sum(1 for i in ids
                   if (e := reqs.get((replica_id, i))) is not None and e.node_id == node_id)

    @property
    def total(self) -> int:
        """Other replicas' requests in flight on all nodes."""
        return len(self._requests)

    def clear(self) -> None:
        """Forget every remote request (the shared view was lost; the floors stay, so stale
        deltas of an old path stay ignored after the reconnect)."""
        self._requests.clear()
        self._by_id.clear()
        self._by_replica.clear()
