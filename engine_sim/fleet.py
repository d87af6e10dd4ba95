"""N simulated engines on a virtual clock, in one process: the engine side of ``--mode sim``.

Each node is exactly the engine ``kvroute serve engine-sim`` runs (:class:`EngineModel` over a
:class:`KVCache`: FIFO queue, admission only when the whole sequence fits, blocks of running
requests pinned, one prefill unit, decode batch), fed precomputed block ids instead of token ids
and with cache events off, so a 12,000-request trace replays in well under a second per policy.

The caller owns the clock and the routing::

    fleet = SimFleet(8, EngineParams(capacity_blocks=957, block_size=512))
    for r in trace:                                   # in arrival order
        for done in fleet.advance(r.arrival_s):       # requests that ended by now, in time order
            core.complete(done.request_id, cached_tokens=done.cached_tokens)
        obs = fleet.observe(now)                      # queue, running, usage, evictions per node
        matched = fleet.believed_match(i, ids, now)   # what the registry believes (lagged)
        fleet.submit(node_idx, SimRequest.from_blocks(rid, ids, prompt_tokens, out), now)
    fleet.drain()                                     # run every queued request to its end

Then every request carries its engine-side truth: ``cached_tokens``, ``admitted_at``,
``first_token_at`` (TTFT = ``first_token_at - arrival``), ``finished_at``.

What the registry would know lags the caches by ``heartbeat_delay_s``: block stores and
evictions become visible to :meth:`SimFleet.believed_match` and :meth:`SimFleet.registry_deltas`
that long after the engine made them, and :meth:`SimFleet.observe` refreshes its load figures
once per ``status_interval_s`` (the heartbeat interval).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from engine_sim.cache import BlockId, KVCache
from engine_sim.model import EngineModel, SimRequest, StepResult
from engine_sim.params import EngineParams
from kvroute.prefill_rate import PrefillRateEstimator

EVICTION_RATE_TAU_S = 10.0
"""Time constant of the decayed eviction rate (model seconds)."""


def full_blocks(block_ids: Sequence[BlockId], prompt_tokens: int,
                block_size: int) -> Sequence[BlockId]:
    """The ids of a prompt's full blocks: an engine hashes (and caches) only full blocks, so a
    trace's id for a trailing partial block is dropped (engine_sim computes that block)."""
    n = prompt_tokens // block_size
    return block_ids if len(block_ids) <= n else block_ids[:n]


@dataclass(frozen=True, slots=True)
class NodeObservation:
    """One engine's load figures as the registry/router would see them (model time)."""

    node_id: str
    queue_depth: int
    """Requests waiting for admission (``vllm:num_requests_waiting``)."""
    running: int
    """Admitted requests, prefilling or decoding (``vllm:num_requests_running``)."""
    used_blocks: int
    """Blocks held by running requests (``vllm:kv_cache_usage_perc`` x capacity)."""
    cached_blocks: int
    """Hashed blocks present (held or evictable)."""
    capacity_blocks: int
    eviction_rate: float
    """Evicted blocks per model second, exponentially decayed (tau 10 s)."""
    evictions_total: int
    pending_prefill_tokens: int
    """Uncached prompt tokens admitted but not yet prefilled, plus the queue's prompt tokens."""
    prefill_tokens_per_s: float = 0.0
    """Prefill rate measured from finished requests' prefill times, as the node agent measures
    it from the engine's metrics (:class:`kvroute.prefill_rate.PrefillRateEstimator`; 0 = not
    measured yet)."""


@dataclass(slots=True)
class NodeDelta:
    """Block changes of one node that became visible to the registry (:meth:`registry_deltas`)."""

    node_idx: int
    stored: list[BlockId] = field(default_factory=list)
    removed: list[BlockId] = field(default_factory=list)
    cleared: bool = False
    """The whole cache was reset before ``stored`` (apply: drop all, then store)."""


class SimNode:
    """One engine: model, cache, the registry's lagging view of it, its load figures."""

    def __init__(self, idx: int, node_id: str, params: EngineParams, delay_s: float,
                 status_interval_s: float, deltas: bool) -> None:
        self.idx = idx
        self.node_id = node_id
        self.delay_s = delay_s
        self.status_interval_s = status_interval_s
        self._lagged = delay_s > 0
        self._deltas = deltas
        self.cache = KVCache(params.capacity_blocks, params.block_size, record_events=False,
                             track_changes=self._lagged or deltas)
        self.model = EngineModel(self.cache, params)
        self.rate = params.prefill_tokens_per_s
        self.busy_s = 0.0
        """Model seconds of prefill work admitted (utilisation = busy / elapsed)."""
        self._log: deque[tuple[float, BlockId | None, bool]] = deque()
        self._believed: set[BlockId] = set()
        self._delta = NodeDelta(idx)
        self._ev_seen = 0
        self._ev_rate = 0.0
        self._ev_t = 0.0
        self._obs: NodeObservation | None = None
        self._obs_t = -math.inf
        self._rate_est = PrefillRateEstimator()

    # ---- stepping ------------------------------------------------------------------------
    def submit(self, req: SimRequest, now: float, finished: list[SimRequest]) -> None:
        """Advance to ``now``, then queue ``req`` (admitted at once when it fits)."""
        self.advance(now, finished)
        self._after(self.model.submit(req, now), now, finished)

    def advance(self, now: float, finished: list[SimRequest]) -> None:
        """Run every request end up to ``now``, one end time at a time (exact timestamps)."""
        m = self.model
        while True:
            t = m.next_event_time()
            if t is None or t > now:
                return
            self._after(m.advance(t), t, finished)

    def _after(self, step: StepResult, t: float, finished: list[SimRequest]) -> None:
        for req in step.admitted:
            self.busy_s += req.uncached_tokens / self.rate
        finished.extend(step.finished)
        evicted = self.cache.counters.evicted_blocks
        if evicted != self._ev_seen:
            self._ev_rate = self._decayed_rate(t) + (evicted - self._ev_seen) / EVICTION_RATE_TAU_S
            self._ev_t = t
            self._ev_seen = evicted
        if self._lagged:
            self._log.extend((t, b, added) for b, added in self.cache.drain_changes())
        elif self._deltas:
            self._apply(self.cache.drain_changes())

    def _decayed_rate(self, now: float) -> float:
        if not self._ev_rate:
            return 0.0
        return self._ev_rate * math.exp(-max(0.0, now - self._ev_t) / EVICTION_RATE_TAU_S)

    # ---- the registry's view ---------------------------------------------------------------
    def _apply(self, changes: Sequence[tuple[BlockId | None, bool]]) -> None:
        believed = self._believed if self._lagged else None
        d = self._delta if self._deltas else None
        for block, added in changes:
            if block is None:  # reset: everything goes
                if believed is not None:
                    believed.clear()
                if d is not None:
                    d.stored.clear()
                    d.removed.clear()
                    d.cleared = True
            elif added:
                if believed is not None:
                    believed.add(block)
                if d is not None:
                    d.stored.append(block)
            else:
                if believed is not None:
                    believed.discard(block)
                if d is not None:
                    d.removed.append(block)

    def _catch_up(self, now: float) -> None:
        limit = now - self.delay_s
        log = self._log
        if not log or log[0][0] > limit:
            return
        batch: list[tuple[BlockId | None, bool]] = []
        while log and log[0][0] <= limit:
            _, block, added = log.popleft()
            batch.append((block, added))
        self._apply(batch)

    def believed_match(self, block_ids: Sequence[BlockId], now: float) -> int:
        """Leading ``block_ids`` the registry believes cached at ``now`` (no 1-token rule)."""
        if not self._lagged:
            return self.cache.leading_cached(block_ids)
        self._catch_up(now)
        believed = self._believed
        n = 0
        for b in block_ids:
            if b not in believed:
                break
            n += 1
        return n

    def take_delta(self, now: float) -> NodeDelta | None:
        """Changes visible by ``now`` since the last call, or None when there are none."""
        if self._lagged:
            self._catch_up(now)
        d = self._delta
        if not (d.stored or d.removed or d.cleared):
            return None
        self._delta = NodeDelta(self.idx)
        return d

    @property
    def nid(self) -> str:
        """The node id (``bench.sim.source.SimNode`` protocol)."""
        return self.node_id

    def reported(self, now: float) -> tuple[int, int, int, int, float]:
        """``(queue depth, running, used blocks, capacity blocks, eviction rate)`` as the
        registry last heard (``bench.sim.source.SimNode`` protocol; see :meth:`observe`)."""
        o = self.observe(now)
        return o.queue_depth, o.running, o.used_blocks, o.capacity_blocks, o.eviction_rate

    def observe(self, now: float) -> NodeObservation:
        """Load figures, refreshed at most once per ``status_interval_s`` (0 = live)."""
        if self._obs is not None and now - self._obs_t < self.status_interval_s:
            return self._obs
        m, c = self.model, self.cache
        self._obs = NodeObservation(
            node_id=self.node_id, queue_depth=m.num_waiting, running=m.num_running,
            used_blocks=c.used_blocks, cached_blocks=c.cached_blocks, capacity_blocks=c.capacity,
            eviction_rate=self._decayed_rate(now), evictions_total=c.counters.evicted_blocks,
            pending_prefill_tokens=m.pending_prefill_tokens(now),
            prefill_tokens_per_s=self._rate_est.update(m.prefill_computed_tokens_total,
                                                       m.prefill_seconds_total))
        self._obs_t = now
        return self._obs

    def prefill_rate(self, now: float) -> float:
        """The measured prefill rate as last reported (``bench.sim.source.SimNode``; 0 = not
        measured yet)."""
        return self.observe(now).prefill_tokens_per_s


class SimFleet:
    """``n`` engines with the same :class:`EngineParams`, driven by the caller's clock.

    ``heartbeat_delay_s``: how far the registry's view of each cache lags (0 = live);
    ``status_interval_s``: how often load figures refresh (default: the same lag; 0 = live);
    ``registry_deltas``: keep per-node store/evict deltas for :meth:`registry_deltas` (to feed
    a prefix index the way heartbeats feed the registry's); ``roles``: each node's
    disaggregation role (default: ``params.role`` for all).
    """

    def __init__(self, n: int, params: EngineParams, *, heartbeat_delay_s: float = 0.0,
                 status_interval_s: float | None = None,
                 node_ids: Sequence[str] | None = None, registry_deltas: bool = False,
                 roles: Sequence[str] | None = None) -> None:
        if n < 1:
            raise ValueError("a fleet needs at least one engine")
        if heartbeat_delay_s < 0 or (status_interval_s is not None and status_interval_s < 0):
            raise ValueError("heartbeat_delay_s and status_interval_s must be >= 0")
        ids = list(node_ids) if node_ids is not None else [f"node-{i}" for i in range(n)]
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"node_ids must be {n} distinct names")
        interval = heartbeat_delay_s if status_interval_s is None else status_interval_s
        if roles is not None and len(roles) != n:
            raise ValueError(f"roles must name {n} roles")
        self.params = params
        self.roles = list(roles) if roles is not None else [params.role] * n
        """Per node: ``both``, ``prefill`` or ``decode`` (disaggregated fleets)."""
        self.nodes = [SimNode(i, ids[i], replace(params, role=self.roles[i]), heartbeat_delay_s,
                              interval, registry_deltas) for i in range(n)]
        self.node_ids = ids
        self.index = {nid: i for i, nid in enumerate(ids)}
        self.now = 0.0

    def __len__(self) -> int:
        return len(self.nodes)

    def _clock(self, now: float) -> None:
        if now < self.now:
            raise ValueError(f"time went backwards: {now} < {self.now}")
        self.now = now

    def submit(self, node_idx: int, req: SimRequest, now: float) -> list[SimRequest]:
        """Queue ``req`` on node ``node_idx`` at ``now`` (its arrival); admitted when it fits.

        Advances the whole fleet to ``now`` first and returns what finished meanwhile (as
        :meth:`advance`). Raises :class:`engine_sim.model.RequestTooLarge` when the request can
        never fit the node's cache, ValueError for a request id already in flight there.
        """
        finished = self.advance(now)
        self.nodes[node_idx].submit(req, now, finished)
        return finished

    def advance(self, now: float) -> list[SimRequest]:
        """Run every node to ``now``; the requests that finished, by finish time."""
        self._clock(now)
        finished: list[SimRequest] = []
        for node in self.nodes:
            node.advance(now, finished)
        if len(finished) > 1:
            finished.sort(key=_finish_time)
        return finished

    def next_event_time(self) -> float | None:
        """Model time of the next request end anywhere in the fleet, or None when idle."""
        best: float | None = None
        for node in self.nodes:
            t = node.model.next_event_time()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def drain(self) -> list[SimRequest]:
        """Run until every queued and running request has finished; those requests in order."""
        out: list[SimRequest] = []
        while (t := self.next_event_time()) is not None:
            out.extend(self.advance(max(t, self.now)))
        return out

    def observe(self, now: float) -> list[NodeObservation]:
        """Every node's load figures (see :meth:`SimNode.observe`)."""
        return [n.observe(now) for n in self.nodes]

    def believed_match(self, node_idx: int, block_ids: Sequence[BlockId], now: float) -> int:
        """Leading ``block_ids`` the registry believes node ``node_idx`` holds at ``now``."""
        return self.nodes[node_idx].believed_match(block_ids, now)

    def registry_deltas(self, now: float) -> list[NodeDelta]:
        """Per node, the stores/evictions/resets visible by ``now`` since the last call."""
        out: list[NodeDelta] = []
        for n in self.nodes:
            d = n.take_delta(now)
            if d is not None:
                out.append(d)
        return out

    @property
    def busy_s(self) -> list[float]:
        """Prefill model seconds admitted per node."""
        return [n.busy_s for n in self.nodes]

    @property
    def evictions_total(self) -> int:
        """Blocks evicted over the fleet."""
        return sum(n.cache.counters.evicted_blocks for n in self.nodes)


def _finish_time(req: SimRequest) -> float:
    return req.finished_at if req.finished_at is not None else math.inf
