"""Replay of a workload on a *disaggregated* simulated fleet: P prefill and D decode engines.

Every request is routed by the routing core (:meth:`RouterCore.decide_local` with
``disaggregated=True``): a (prefill node, decode node) pair. The replay then does what a
disaggregated proxy does (vLLM's ``kv_transfer_params`` flow, SGLang's bootstrap flow): the
prompt runs on the prefill engine with ``max_tokens=1`` (its cache serves what it holds, it
computes the rest); when that ends, the router's prefill half is released
(:meth:`RouterCore.complete_prefill`) and the request goes to the decode engine marked
``remote_kv``: it receives the blocks its own cache lacks (``transfer_s_per_block`` each, stored
in its cache so follow-up turns find them) and generates. TTFT = arrival to the decode engine's
first token, split into queue (prefill queue + decode admission wait), prefill and transfer.

The fleet is stepped event by event (every request end anywhere), so a prefill that ends at
``t`` reaches its decode engine at exactly ``t``.

Timing of the real stack, as :func:`bench.sim.replay.simulate` models it (``SimSettings``):
``arrival_jitter_s`` delays each request's arrival by a seeded uniform draw (``seed``),
``complete_lag_s`` delays the router hearing of each half's end (the prefill release and the
final ``Complete``), ``heartbeat_delay_s`` lags its view of the caches and load. A stack run's
own measured lags per request (``timing``, :class:`bench.sim.timing.RequestTiming`: its
prefill engine arrivals) replace the uniform jitter as in the aggregated replay: each request
reaches its prefill engine as measured and is decided at a seeded point between its schedule
and that arrival; TTFT counts from the prefill engine's arrival, as the stack's records do.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bench.results import PolicyRun
from bench.sim.config import SimSettings
from bench.sim.late import LateNews
from bench.sim.replay import SIM_MODEL, _FleetView
from bench.sim.source import SimPlacementSource
from bench.sim.timing import RequestTiming, request_times
from bench.sim.tracker import make_tracker
from bench.workloads.base import Workload
from engine_sim.fleet import SimFleet, full_blocks
from engine_sim.model import RequestTooLarge, SimRequest
from kvroute.errors import KvrouteError
from router_service.core import RouterCore
from router_service.disagg import DisaggSettings
from router_service.domain import RouteRequest
from router_service.policies.base import Policy
from router_service.policies.factory import PolicySet
from router_service.settings import RouterSettings
from router_service.tokenizer import load_tokenizer


@dataclass
class PdRun:
    """A disaggregated replay: the aggregated fields (``run.node`` = prefill node, cached
    tokens = what the prefill engine's cache served) plus the decode half, per request."""

    run: PolicyRun
    prefill_nodes: int
    decode_node: list[int] = field(default_factory=list)
    """Fleet index of the decode node (-1 = failed)."""
    transfer_blocks: list[int] = field(default_factory=list)
    """Blocks the decode engine received."""
    transfer_s: list[float] = field(default_factory=list)
    queue_s: list[float] = field(default_factory=list)
    """Prefill queue + decode admission wait."""
    prefill_s: list[float] = field(default_factory=list)
    decode_held_tokens: list[int] = field(default_factory=list)
    """Prompt tokens the decode engine's own cache already held."""
    predicted_transfer_blocks: list[int] = field(default_factory=list)


def simulate_pd(workload: Workload, policy: Policy, cfg: SimSettings, prefill_nodes: int,
                decode_nodes: int, transfer_s_per_block: float,
                disagg: DisaggSettings | None = None,
                progress: Callable[[int], None] | None = None,
                router_prefill_tokens_per_s: float | None = None,
                label: str | None = None, seed: int = 0,
                timing: RequestTiming | None = None) -> PdRun:
    """Replay ``workload`` on ``prefill_nodes`` + ``decode_nodes`` engines (module docstring);
    ``policy`` picks the prefill node, ``disagg`` configures the decode choice, ``timing``
    replays a stack run's measured prefill engine arrivals."""
    if prefill_nodes < 1 or decode_nodes < 1:
        raise ValueError("a disaggregated fleet needs >= 1 prefill and >= 1 decode node")
    t_wall = time.perf_counter()
    reqs = workload.requests
    n_req = len(reqs)
    bs = cfg.block_size or workload.block_size
    params = replace(cfg.engine_params(cfg.cache_blocks, bs),
                     transfer_s_per_block=transfer_s_per_block)
    n = prefill_nodes + decode_nodes
    roles = ["prefill"] * prefill_nodes + ["decode"] * decode_nodes
    ids = [f"prefill-{i}" for i in range(prefill_nodes)] + \
          [f"decode-{i}" for i in range(decode_nodes)]
    fleet = SimFleet(n, params, heartbeat_delay_s=cfg.heartbeat_delay_s, node_ids=ids,
                     roles=roles)
    run = PolicyRun(label or policy.name, list(ids), n_req)
    run.init_requests(n_req)
    nan = math.nan
    pd = PdRun(run, prefill_nodes, [-1] * n_req, [0] * n_req, [nan] * n_req, [nan] * n_req,
               [nan] * n_req, [0] * n_req, [0] * n_req)
    tracker = make_tracker(router_prefill_tokens_per_s or params.prefill_tokens_per_s)
    source = SimPlacementSource([_FleetView(fleet, i) for i in range(n)], SIM_MODEL, bs,
                                tracker.clock_now, roles=roles)
    core = RouterCore(RouterSettings(registry="in-process:0", default_policy=policy.name,
                                     default_model=SIM_MODEL, block_size=bs,
                                     max_prompt_tokens=10**9),
                      PolicySet.of(policy), source, tracker, load_tokenizer("simple"),
                      disagg=disagg)
    index = {r.request_id: i for i, r in enumerate(reqs)}
    first_half: dict[str, SimRequest] = {}
    decode_of: dict[str, int] = {}

    def hear(_at: float, end: tuple[str, int]) -> None:
        """The router hears of a half's end (cached tokens -1: the prefill half)."""
        rid, cached = end
        if cached < 0:
            core.complete_prefill(rid)
        else:
            core.complete(rid, cached_tokens=cached)

    late = LateNews(cfg.complete_lag_s, hear)  # (request id, cached tokens or -1)

    def handle(done: list[SimRequest]) -> None:
        for s in done:
            rid = s.request_id
            i = index[rid]
            if first_half.get(rid) is s:  # prefill ended: hand the KV over
                del first_half[rid]
                late.tell(s.first_token_at or fleet.now, i, (rid, -1))
                run.cached_tokens[i] = s.cached_tokens
                pd.prefill_s[i] = (s.first_token_at or 0.0) - (s.prefill_start or 0.0)
                pd.queue_s[i] = (s.prefill_start or 0.0) - s.arrival
                r = reqs[i]
                dreq = SimRequest.from_blocks(rid, s.block_hashes, r.prompt_tokens,
                                              max(1, r.output_tokens))
                dreq.remote_kv = True
                try:
                    more = fleet.submit(decode_of[rid], dreq, fleet.now)
                except RequestTooLarge as exc:
                    _fail(run, pd, i, core, rid, exc)
                    continue
                handle(more)
                continue
            # the decode half ended
            t0 = run.arrival_s[i]
            pd.transfer_blocks[i] = s.transfer_blocks
            pd.transfer_s[i] = s.transfer_s
            pd.decode_held_tokens[i] = s.cached_tokens
            pd.queue_s[i] += (s.admitted_at or 0.0) - s.arrival
            if s.first_token_at is not None:
                run.ttft_s[i] = s.first_token_at - t0
            if s.finished_at is not None:
                run.e2e_s[i] = s.finished_at - t0
                run.t_end_s = max(run.t_end_s, s.finished_at)
            late.tell(s.finished_at or fleet.now, i, (rid, run.cached_tokens[i]))

    on_the_way: list[tuple[float, int, int, SimRequest]] = []  # decided, not at its engine yet

    def step_to(t: float) -> None:
        """Every engine event and prefill engine arrival due by ``t``, in time order."""
        while True:
            te = fleet.next_event_time()
            ta = on_the_way[0][0] if on_the_way else None
            if (te is None or te > t) and (ta is None or ta > t):
                break
            if te is not None and (ta is None or te < ta):
                handle(fleet.advance(max(te, fleet.now)))
            else:
                at, _, node, sreq = heapq.heappop(on_the_way)
                handle(fleet.advance(max(at, fleet.now)))
                handle(fleet.submit(node, sreq, fleet.now))
        if t < math.inf:
            handle(fleet.advance(t))

    # decisions, and arrivals at the prefill engines (as measured, never before the decision)
    arrivals, at_engine = request_times(workload, cfg.arrival_jitter_s, seed, timing)
    for i, r in enumerate(reqs):
        now = arrivals[i]
        step_to(now)
        late.hear_until(now)
        tracker.now = now
        run.arrival_s[i] = at_engine[i]  # TTFT counts from the prefill engine's arrival
        run.prompt_tokens[i] = r.prompt_tokens
        try:
            d = core.decide_local(RouteRequest(
                request_id=r.request_id, block_hashes=r.block_hashes,
                num_prompt_tokens=r.prompt_tokens, session_id=r.session_key,
                max_output_tokens=r.output_tokens, disaggregated=True))
            sreq = SimRequest.from_blocks(r.request_id,
                                          full_blocks(r.block_hashes, r.prompt_tokens, bs),
                                          r.prompt_tokens, 1)
            first_half[r.request_id] = sreq
            decode_of[r.request_id] = fleet.index[d.decode_node_id]
            node = fleet.index[d.node_id]
            if at_engine[i] > now:
                fleet.nodes[node].model.check_fits(sreq)  # refused now, as a submit would be
                heapq.heappush(on_the_way, (at_engine[i], i, node, sreq))
            else:
                handle(fleet.submit(node, sreq, now))
        except (KvrouteError, RequestTooLarge) as exc:
            first_half.pop(r.request_id, None)
            _fail(run, pd, i, core, r.request_id, exc)
            continue
        run.node[i] = fleet.index[d.node_id]
        pd.decode_node[i] = fleet.index[d.decode_node_id]
        run.predicted_cached_tokens[i] = d.expected_cached_tokens
        pd.predicted_transfer_blocks[i] = d.transfer_blocks
        if progress is not None and i % 500 == 499:
            progress(500)
    step_to(math.inf)
    late.hear_until(math.inf)
    if progress is not None:
        progress(n_req % 500)
    run.busy_s = fleet.busy_s[:prefill_nodes]
    run.evictions = fleet.evictions_total
    run.wall_s = time.perf_counter() - t_wall
    return pd


def _fail(run: PolicyRun, pd: PdRun, i: int, core: RouterCore, rid: str,
          exc: Exception) -> None:
    core.complete(rid)
    run.failed += 1
    run.node[i] = -1
    pd.decode_node[i] = -1
    if len(run.notes) < 5:
        run.notes.append(f"{rid}: {exc}")
