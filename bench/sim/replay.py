"""Replay of a workload on a simulated fleet, in one process, on a virtual clock.

The engines are engine_sim's own model (:class:`engine_sim.fleet.SimFleet`: FIFO queue,
admission only when the whole sequence fits, blocks of running requests pinned, one prefill unit,
decode batch) — the engine ``kvroute serve engine-sim`` runs, fed the trace's block ids. Every
decision is the routing core's own: :meth:`router_service.core.RouterCore.decide_local` over a
:class:`~bench.sim.source.SimPlacementSource` (what the registry believes: each cache as of
``heartbeat_delay_s`` ago, load figures refreshed once per that interval) and the router's
:class:`LoadTracker` on the simulated clock; finished requests go back through
:meth:`RouterCore.complete` with the engine's cached tokens. So ``--mode sim`` measures exactly
what serves traffic. The hit rate is what each engine's cache served at admission.

Peer re-implementations that keep their own state update it on ``commit`` and get
``on_prefill_done`` / ``on_complete`` callbacks at the engine's times.

Timing of the real stack (``SimSettings``): ``arrival_jitter_s`` delays each request's arrival
(router and engine alike) by a seeded uniform draw, as the client and network lag of ``--mode
stack`` does; ``complete_lag_s`` delays the router's (and a peer's) ``complete`` after the
engine finished, as the response's trip back and the ``Complete`` call do. Both default to 0
(the schedule exactly). A stack run's own measured timing per request (``timing``,
:class:`bench.sim.timing.RequestTiming`) replaces both: each request reaches its engine and is
heard back as measured, and is decided at a seeded point between its schedule and its engine
arrival. Policies that decide on in-flight counts alone (``least_loaded``) are
chaotic in these: a few milliseconds move which node a conversation's next turn meets, so
their hit rate is a distribution, and ``--repeat`` samples it.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence

from bench.results import PolicyRun
from bench.sim.config import SimSettings
from bench.sim.late import LateNews
from bench.sim.replicas import ReplicaSettings, ShareBus, Spreader, make_share
from bench.sim.source import SimPlacementSource
from bench.sim.timing import RequestTiming, request_times
from bench.sim.tracker import make_tracker
from bench.workloads.base import Workload
from engine_sim.fleet import SimFleet, full_blocks
from engine_sim.model import RequestTooLarge, SimRequest
from kvroute.errors import KvrouteError
from router_service.core import RouterCore
from router_service.domain import RouteRequest
from router_service.policies.base import Policy
from router_service.policies.factory import PolicySet
from router_service.settings import RouterSettings
from router_service.tokenizer import load_tokenizer

SIM_MODEL = "sim-model"
"""The model every simulated node serves."""


class _FleetView:
    """One simulated node as the placement source reads it (registry's view)."""

    __slots__ = ("fleet", "idx", "nid")

    def __init__(self, fleet: SimFleet, idx: int) -> None:
        self.fleet = fleet
        self.idx = idx
        self.nid = fleet.node_ids[idx]

    def believed_match(self, hashes: Sequence[int], now: float) -> int:
        return self.fleet.believed_match(self.idx, hashes, now)

    def reported(self, now: float) -> tuple[int, int, int, int, float]:
        o = self.fleet.nodes[self.idx].observe(now)
        return o.queue_depth, o.running, o.used_blocks, o.capacity_blocks, o.eviction_rate

    def prefill_rate(self, now: float) -> float:
        return self.fleet.nodes[self.idx].prefill_rate(now)


def simulate(workload: Workload, policy: Policy, cfg: SimSettings,
             progress: Callable[[int], None] | None = None,
             router_prefill_tokens_per_s: float | None = None,
             replicas: ReplicaSettings | None = None,
             make_policy: Callable[[], Policy] | None = None, seed: int = 0,
             node_ids: Sequence[str] | None = None,
             timing: RequestTiming | None = None) -> PolicyRun:
    """Replay ``workload`` under ``policy`` on a fresh simulated fleet (module docstring).

    ``router_prefill_tokens_per_s`` is the drain rate the router's load tracker assumes (the
    router's configured ``--kv-prefill-tokens-per-s``); default: the engines' true rate.
    With ``replicas.routers`` > 1, ``policy`` is the first replica's and ``make_policy`` builds
    the others' (:mod:`bench.sim.replicas`). ``node_ids`` names the simulated nodes (default
    ``node-<i>``; policies that hash node ids, like ``session``'s ring, map keys by name, so a
    comparison with a stack run uses the stack's names). ``timing``: a stack run's measured lags
    per request, replayed (:mod:`bench.sim.timing`, :mod:`bench.agreement`); the seeded jitter
    of ``arrival_jitter_s`` is added to the decision points it draws.
    """
    if cfg.latency_model != "default":
        raise ValueError(f"latency model {cfg.latency_model!r}: --mode sim runs engine_sim's "
                         f"engine model only")
    rs = replicas or ReplicaSettings()
    if rs.routers > 1 and make_policy is None:
        raise ValueError("several router replicas need make_policy (one policy per replica)")
    t_wall = time.perf_counter()
    reqs = workload.requests
    n_req = len(reqs)
    bs = cfg.block_size or workload.block_size
    params = cfg.engine_params(cfg.cache_blocks, bs)
    fleet = SimFleet(cfg.nodes, params, heartbeat_delay_s=cfg.heartbeat_delay_s,
                     node_ids=node_ids)
    run = PolicyRun(policy.name, list(fleet.node_ids), n_req)
    run.init_requests(n_req)
    rate = router_prefill_tokens_per_s or params.prefill_tokens_per_s
    trackers = [make_tracker(rate) for _ in range(rs.routers)]
    clock = trackers[0].clock_now
    source = SimPlacementSource([_FleetView(fleet, i) for i in range(cfg.nodes)], SIM_MODEL,
                                bs, clock, calibrate=rs.calibrate)
    bus = ShareBus(rs.share_delay_s) if rs.routers > 1 and rs.share_routes else None
    policies = [policy] + [make_policy() for _ in range(rs.routers - 1)] if make_policy \
        else [policy]
    cores = [RouterCore(RouterSettings(registry="in-process:0", default_policy=policy.name,
                                       default_model=SIM_MODEL, block_size=bs,
                                       max_prompt_tokens=10**9),
                        PolicySet.of(pol), source, tr, load_tokenizer("simple"),
                        share=make_share(bus, k, clock, rs) if bus is not None else None)
             for k, (pol, tr) in enumerate(zip(policies, trackers, strict=True))]
    if bus is not None:
        bus.cores = cores
    spreader = Spreader(rs, seed)
    callbacks = [(getattr(p, "on_prefill_done", None), getattr(p, "on_complete", None),
                  getattr(p, "on_prompt_text", None)) for p in policies]
    owner: dict[str, int] = {}
    index = {r.request_id: i for i, r in enumerate(reqs)}
    prefilling: list[tuple[int, SimRequest]] = []  # submitted, prefill-done callback not given
    arrivals, at_engine = request_times(workload, cfg.arrival_jitter_s, seed, timing)
    on_the_way: list[tuple[float, int, int, SimRequest]] = []  # decided, not yet at the engine
    waited_s: dict[int, float] = {}  # request -> seconds its staggered decision waited
    sample_every = max(1, n_req // 400)

    def set_now(now: float) -> None:
        for tr in trackers:
            tr.now = now
        if bus is not None:
            bus.deliver(now)

    def prefills_done(now: float) -> None:
        if not prefilling:
            return
        keep = []
        for k, s in prefilling:
            if s.first_token_at is not None and s.first_token_at <= now:
                cb = callbacks[k][0]
                if cb is not None:
                    cb(s.request_id)
            else:
                keep.append((k, s))
        prefilling[:] = keep

    def finished(done: list[SimRequest]) -> None:
        for s in done:
            i = index[s.request_id]
            end = s.finished_at or 0.0
            prefills_done(end)
            run.cached_tokens[i] = s.cached_tokens
            extra = waited_s.pop(i, 0.0)  # a staggered decision's wait counts for the user
            if s.ttft is not None:
                run.ttft_s[i] = s.ttft + extra
            if s.finished_at is not None:
                run.e2e_s[i] = s.finished_at - s.arrival + extra
                run.t_end_s = max(run.t_end_s, s.finished_at)
            late.tell(end, i, (s.request_id, s.cached_tokens),
                      None if timing is None else timing.return_lag(i, cfg.complete_lag_s))

    def heard(at: float, done: tuple[str, int]) -> None:
        """The router (and the policy's own state) learns the request completed."""
        request_id, cached_tokens = done
        k = owner.pop(request_id, 0)
        if bus is not None:
            set_now(at)
        cores[k].complete(request_id, cached_tokens=cached_tokens)
        on_complete = callbacks[k][1]
        if on_complete is not None:
            on_complete(request_id)

    late = LateNews(cfg.complete_lag_s, heard)  # (request id, cached tokens)

    def reach_engines(now: float) -> None:
        """Submit the decided requests whose engine arrival is due by ``now``, in time order."""
        while on_the_way and on_the_way[0][0] <= now:
            at, _i, node, sreq = heapq.heappop(on_the_way)
            finished(fleet.submit(node, sreq, at))

    def route(i: int, now: float, k: int, waited: float) -> None:
        """Replica ``k`` decides request ``i`` at ``now`` (``waited`` after its arrival)."""
        r = reqs[i]
        reach_engines(now)
        finished(fleet.advance(now))
        prefills_done(now)
        late.hear_until(now)
        set_now(now)
        run.arrival_s[i] = now - waited
        if waited > 0:
            waited_s[i] = waited
        run.prompt_tokens[i] = r.prompt_tokens
        core = cores[k]
        on_prompt_text = callbacks[k][2]
        if on_prompt_text is not None:
            on_prompt_text(r.request_id, r.prompt_text_head)
        try:
            d = core.decide_local(RouteRequest(
                request_id=r.request_id, block_hashes=r.block_hashes,
                num_prompt_tokens=r.prompt_tokens, session_id=r.session_key,
                max_output_tokens=r.output_tokens))
            node = fleet.index[d.node_id]
            owner[r.request_id] = k
            sreq = SimRequest.from_blocks(r.request_id,
                                          full_blocks(r.block_hashes, r.prompt_tokens, bs),
                                          r.prompt_tokens, max(1, r.output_tokens))
            if at_engine[i] > now:
                fleet.nodes[node].model.check_fits(sreq)  # refused now, as a submit would be
                heapq.heappush(on_the_way, (at_engine[i], i, node, sreq))
            else:
                finished(fleet.submit(node, sreq, now))
        except (KvrouteError, RequestTooLarge) as exc:
            core.complete(r.request_id)
            owner.pop(r.request_id, None)
            run.failed += 1
            if len(run.notes) < 5:
                run.notes.append(f"{r.request_id}: {exc}")
            return
        run.node[i] = node
        run.predicted_cached_tokens[i] = d.expected_cached_tokens
        if callbacks[k][0] is not None:
            prefilling.append((k, sreq))
        if i % sample_every == 0:
            run.load_samples.append((now, [sum(tr.inflight(n) for tr in trackers)
                                           for n in fleet.node_ids]))
        if progress is not None and i % 500 == 499:
            progress(500)

    waiting: list[tuple[float, int, int]] = []  # staggered decisions: (decide at, request, replica)
    for i in range(n_req):  # arrivals keep the trace order
        now = arrivals[i]
        while waiting and waiting[0][0] <= now:
            at, j, kj = heapq.heappop(waiting)
            route(j, at, kj, at - arrivals[j])
        k = spreader.pick()
        share = cores[k].share
        if share is not None and share.burst_stagger_s:
            set_now(now)
            wait = share.stagger_wait()  # its turn in a burst (--share-burst-stagger-s)
            if wait > 0:
                heapq.heappush(waiting, (now + wait, i, k))
                continue
        route(i, now, k, 0.0)
    while waiting:
        at, j, kj = heapq.heappop(waiting)
        route(j, at, kj, at - arrivals[j])
    reach_engines(float("inf"))
    finished(fleet.drain())
    late.hear_until(float("inf"))
    if progress is not None:
        progress(n_req % 500)
    run.busy_s = fleet.busy_s
    run.evictions = fleet.evictions_total
    run.wall_s = time.perf_counter() - t_wall
    return run
