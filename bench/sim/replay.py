"""Discrete-event replay of a workload on a simulated fleet, in one process.

Events (arrivals, prefill completions, decode completions) run off a heap on a simulated clock.
Each node is an engine: a finite LRU block cache, one prefill at a time from a FIFO queue (time
= uncached prompt tokens / prefill rate), and up to ``max_batch`` requests decoding at
``decode_s_per_token`` each. The hit rate is what the node's cache served when the request's
prefill *started* — measured on the engine, never taken from the router.

Every decision is the routing core's own: :meth:`router_service.core.RouterCore.decide_local`
with a :class:`~bench.sim.source.SimPlacementSource` (matched blocks from the registry's belief —
the cache contents, optionally ``heartbeat_delay_s`` old — and the engine's reported queue,
usage and eviction rate) and the router's :class:`LoadTracker` on the simulated clock, so the
bench measures exactly what serves traffic. Peer re-implementations that keep their own state
update it on ``commit`` and get ``on_prefill_done`` / ``on_complete`` callbacks.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from bench.results import PolicyRun
from bench.sim.cache import LruBlockCache
from bench.sim.config import SimSettings
from bench.sim.source import SimPlacementSource
from bench.sim.tracker import make_tracker
from bench.workloads.base import Workload
from kvroute.errors import KvrouteError
from router_service.core import RouterCore
from router_service.domain import RouteRequest
from router_service.policies.base import Policy
from router_service.policies.registry import PolicySet
from router_service.settings import RouterSettings
from router_service.tokenizer import load_tokenizer

SIM_MODEL = "sim-model"
"""The model every simulated node serves."""

_PREFILL_DONE = 0
_DECODE_DONE = 1
_EVICT_TAU_S = 10.0
_SEED_PREFILL_S = 0.050
_SEED_TRANSFER_S = 0.002
_SEED_DECODE_S = 0.100


class _Node:
    __slots__ = ("busy_s", "cache", "decode_wait", "decoding", "ev_rate", "ev_t", "idx",
                 "last_report", "nid", "prefilling", "queue", "report_interval_s", "reported_t")

    def __init__(self, idx: int, capacity: int, delay_s: float) -> None:
        self.idx = idx
        self.nid = f"node-{idx}"
        self.cache = LruBlockCache(capacity, delay_s)
        self.queue: deque[int] = deque()
        self.prefilling = False
        self.decoding = 0
        self.decode_wait: deque[int] = deque()
        self.busy_s = 0.0
        self.ev_rate = 0.0
        self.ev_t = 0.0
        self.last_report = (0, 0, 0)
        self.reported_t = -1e18
        self.report_interval_s = delay_s

    def status(self, now: float, interval_s: float) -> tuple[int, int, int]:
        """(queue depth, running, used blocks) as last reported: live when ``interval_s`` is 0,
        else refreshed once per heartbeat interval (the registry's view)."""
        if interval_s <= 0 or now - self.reported_t >= interval_s:
            self.last_report = (len(self.queue), self.decoding + (1 if self.prefilling else 0),
                                len(self.cache))
            self.reported_t = now
        return self.last_report

    def reported(self, now: float) -> tuple[int, int, int, int, float]:
        """(queue, running, used, capacity, eviction rate) as the registry last heard."""
        q, running, used = self.status(now, self.report_interval_s)
        return q, running, used, self.cache.capacity, self.eviction_rate(now)

    def believed_match(self, hashes: Sequence[int], now: float) -> int:
        """Leading blocks the registry believes cached."""
        return self.cache.believed_match(hashes, now)

    def eviction_rate(self, now: float) -> float:
        return self.ev_rate * math.exp(-(now - self.ev_t) / _EVICT_TAU_S) if self.ev_rate else 0.0

    def note_evictions(self, n: int, now: float) -> None:
        self.ev_rate = self.eviction_rate(now) + n / _EVICT_TAU_S
        self.ev_t = now


def simulate(workload: Workload, policy: Policy, cfg: SimSettings,
             progress: Callable[[int], None] | None = None,
             router_prefill_tokens_per_s: float | None = None) -> PolicyRun:
    """Replay ``workload`` under ``policy`` on a fresh simulated fleet (module docstring).

    ``router_prefill_tokens_per_s`` is the drain rate the router's load tracker assumes (the
    router's configured ``--kv-prefill-tokens-per-s``); default: the engines' true rate.
    """
    t_wall = time.perf_counter()
    reqs = workload.requests
    n_req = len(reqs)
    bs = cfg.block_size or workload.block_size
    seed_model = cfg.latency_model == "seed"
    rate = cfg.prefill_tokens_per_s
    nodes = [_Node(i, cfg.cache_blocks, cfg.heartbeat_delay_s) for i in range(cfg.nodes)]
    by_id = {n.nid: n for n in nodes}
    run = PolicyRun(policy.name, [n.nid for n in nodes], n_req)
    run.init_requests(n_req)
    tracker = make_tracker(router_prefill_tokens_per_s or rate)
    on_prefill_done: Any = getattr(policy, "on_prefill_done", None)
    on_complete: Any = getattr(policy, "on_complete", None)
    on_prompt_text: Any = getattr(policy, "on_prompt_text", None)
    source = SimPlacementSource(nodes, SIM_MODEL, bs, tracker.clock_now)
    core = RouterCore(RouterSettings(registry="in-process:0", default_policy=policy.name,
                                     default_model=SIM_MODEL, block_size=bs,
                                     max_prompt_tokens=10**9),
                      PolicySet.of(policy), source, tracker, load_tokenizer("simple"))
    heap: list[tuple[float, int, int, int, int]] = []
    seq = 0
    sample_every = max(1, n_req // 400)

    def start_prefill(node: _Node, now: float) -> None:
        nonlocal seq
        i = node.queue.popleft()
        r = reqs[i]
        matched = node.cache.match(r.block_hashes)
        cached = r.cached_tokens(matched, bs)
        ev = node.cache.use(r.block_hashes, now)
        if ev:
            node.note_evictions(ev, now)
        run.cached_tokens[i] = cached
        uncached = r.prompt_tokens - cached
        if seed_model:
            dur = _SEED_PREFILL_S * uncached / max(1, r.prompt_tokens)
        else:
            dur = uncached / rate
        node.prefilling = True
        node.busy_s += dur
        seq += 1
        heapq.heappush(heap, (now + dur, _PREFILL_DONE, seq, node.idx, i))

    def start_decode(node: _Node, i: int, now: float) -> None:
        nonlocal seq
        node.decoding += 1
        dur = _SEED_DECODE_S if seed_model else reqs[i].output_tokens * cfg.decode_s_per_token
        seq += 1
        heapq.heappush(heap, (now + dur, _DECODE_DONE, seq, node.idx, i))

    def handle(ev: tuple[float, int, int, int, int]) -> None:
        now, kind, _, ni, i = ev
        node = nodes[ni]
        if kind == _PREFILL_DONE:
            node.prefilling = False
            run.ttft_s[i] = now - run.arrival_s[i] + (_SEED_TRANSFER_S if seed_model else 0.0)
            if on_prefill_done is not None:
                on_prefill_done(reqs[i].request_id)
            if node.decoding < cfg.max_batch:
                start_decode(node, i, now)
            else:
                node.decode_wait.append(i)
            if node.queue:
                start_prefill(node, now)
        else:
            node.decoding -= 1
            run.e2e_s[i] = now - run.arrival_s[i]
            run.t_end_s = max(run.t_end_s, now)
            tracker.complete(reqs[i].request_id)
            if on_complete is not None:
                on_complete(reqs[i].request_id)
            if node.decode_wait:
                start_decode(node, node.decode_wait.popleft(), now)

    for i, r in enumerate(reqs):
        now = r.arrival_s
        while heap and heap[0][0] <= now:
            handle(heapq.heappop(heap))
        tracker.now = now
        run.arrival_s[i] = now
        run.prompt_tokens[i] = r.prompt_tokens
        if on_prompt_text is not None:
            on_prompt_text(r.request_id, r.prompt_text_head)
        try:
            d = core.decide_local(RouteRequest(
                request_id=r.request_id, block_hashes=r.block_hashes,
                num_prompt_tokens=r.prompt_tokens, session_id=r.session_key,
                max_output_tokens=r.output_tokens))
        except KvrouteError as exc:
            run.failed += 1
            if len(run.notes) < 5:
                run.notes.append(f"{r.request_id}: {exc}")
            continue
        node = by_id[d.node_id]
        run.node[i] = node.idx
        run.predicted_cached_tokens[i] = d.expected_cached_tokens
        node.queue.append(i)
        if not node.prefilling:
            start_prefill(node, now)
        if i % sample_every == 0:
            run.load_samples.append((now, [tracker.inflight(n.nid) for n in nodes]))
        if progress is not None and i % 500 == 499:
            progress(500)
    while heap:
        handle(heapq.heappop(heap))
    if progress is not None:
        progress(n_req % 500)
    run.busy_s = [n.busy_s for n in nodes]
    run.evictions = sum(n.cache.evictions for n in nodes)
    run.wall_s = time.perf_counter() - t_wall
    return run
