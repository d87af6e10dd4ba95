"""The fleet simulation: LRU caches, engine-measured hits, queues, bounds, heartbeat lag."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest

from bench.bounds import merged_lru, oracle
from bench.metrics import policy_metrics
from bench.policies import ALL_POLICIES, build_policy
from bench.sim.config import SimSettings
from bench.sim.replay import simulate
from bench.workloads import load_workload
from bench.workloads.base import TraceRequest, Workload
from router_service.policies.base import Decision, NodeView, RequestView


class _Fixed:
    """Always the given node, claiming whatever the view says is cached."""

    name = "fixed"

    def __init__(self, node: str) -> None:
        self.node = node

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        v = next(n for n in nodes if n.node_id == self.node)
        return Decision(v.node_id, v.matched_blocks, "fixed")

    def commit(self, request: RequestView, decision: Decision) -> None:
        return None


def _req(i: int, t: float, hashes: tuple[int, ...], out: int = 10) -> TraceRequest:
    return TraceRequest(f"r{i}", t, hashes, len(hashes) * 16, out)


def test_hits_are_what_the_engine_cache_served() -> None:
    wl = Workload("t", 16, [_req(0, 0.0, (1, 2, 3)), _req(1, 10.0, (1, 2, 3, 4)),
                            _req(2, 20.0, (1, 2, 3, 4))])
    cfg = SimSettings(nodes=2, cache_blocks=100, prefill_tokens_per_s=16.0,
                      decode_s_per_token=0.1, block_size=16)
    run = simulate(wl, _Fixed("node-1"), cfg)
    assert run.node == [1, 1, 1]
    # the engine computes at least the last prompt token: a fully cached prompt recomputes its
    # last block, and the router's prediction applies the same rule (NodeState.reusable_blocks)
    assert run.cached_tokens == [0, 48, 48]
    assert run.predicted_cached_tokens == [0, 48, 48]
    # prefill = uncached tokens / rate; each output token after the first takes decode time
    assert run.ttft_s == [3.0, 1.0, 1.0]
    assert math.isclose(run.e2e_s[0], 3.0 + 9 * 0.1)
    m = policy_metrics(run, merged_lru_hit=1.0, oracle_hit=1.0)
    assert m["hit_rate_tokens"] == round(96 / 176, 4)
    assert m["load_max_over_mean"] == 2.0 and m["failed"] == 0


def test_prefill_queue_is_fifo_per_node() -> None:
    wl = Workload("t", 16, [_req(0, 0.0, (1, 2)), _req(1, 0.0, (5, 6))])
    cfg = SimSettings(nodes=1, cache_blocks=100, prefill_tokens_per_s=32.0, block_size=16)
    run = simulate(wl, _Fixed("node-0"), cfg)
    assert run.ttft_s == [1.0, 2.0]
    assert run.busy_s == [2.0]


def test_stale_belief_shows_as_predicted_above_actual() -> None:
    # the first request's blocks are evicted by the second before the third arrives; with a
    # long heartbeat delay the router still believes they are cached
    wl = Workload("t", 16, [_req(0, 0.0, (1, 2)), _req(1, 100.0, (5, 6)),
                            _req(2, 101.0, (1, 2))])
    cfg = SimSettings(nodes=1, cache_blocks=3, block_size=16, heartbeat_delay_s=50.0)
    run = simulate(wl, _Fixed("node-0"), cfg)
    # believed: both blocks, of which the engine would reuse 16 tokens (last token recomputed)
    assert run.predicted_cached_tokens[2] == 16 and run.cached_tokens[2] == 0


def test_bounds_order_and_every_policy_serves_everything() -> None:
    wl = load_workload(workload="mooncake-sample", limit=800)
    cfg = SimSettings(nodes=8, cache_blocks=500, block_size=512)
    orc = oracle(wl).hit_rate_tokens
    merged = merged_lru(wl, 8 * 500).hit_rate_tokens
    assert 0 < merged <= orc
    hits = {}
    for name in ALL_POLICIES:
        run = simulate(wl, build_policy(name, prefill_tokens_per_s=cfg.prefill_tokens_per_s),
                       cfg)
        m = policy_metrics(run, merged, orc)
        assert m["failed"] == 0 and all(n >= 0 for n in run.node), name
        assert all(not math.isnan(x) for x in run.e2e_s), name
        assert m["hit_rate_tokens"] <= orc + 1e-9, name
        hits[name] = m["hit_rate_tokens"]
    assert hits["kv_aware"] > hits["round_robin"] and hits["kv_aware"] > hits["random"]


def test_reported_queue_refreshes_once_per_heartbeat() -> None:
    seen: list[int] = []

    class _Spy(_Fixed):
        def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
            seen.append(nodes[0].queue_depth)
            return super().choose(request, nodes)

    # four simultaneous long requests on an engine that runs one at a time: the live queue
    # grows 0,0,1,2 but the report is frozen for the heartbeat interval
    wl = Workload("t", 16, [_req(i, 0.0, (10 * i + 1, 10 * i + 2)) for i in range(4)])
    live = SimSettings(nodes=1, cache_blocks=100, prefill_tokens_per_s=1.0, block_size=16,
                       max_batch=1)
    simulate(wl, _Spy("node-0"), live)
    assert seen == [0, 0, 1, 2]
    seen.clear()
    lagged = SimSettings(nodes=1, cache_blocks=100, prefill_tokens_per_s=1.0, block_size=16,
                         max_batch=1, heartbeat_delay_s=5.0)
    simulate(wl, _Spy("node-0"), lagged)
    assert seen == [0, 0, 0, 0]


def test_timing_of_the_stack_is_modelled_and_seeded() -> None:
    """arrival_jitter_s delays arrivals in trace order, per seed; complete_lag_s delays only
    what the router hears (every request still completes, the cache-blind order is unchanged)."""
    import dataclasses

    from bench.sim.timing import arrival_times

    wl = load_workload(workload="mooncake-sample", limit=200)
    base = arrival_times(wl, 0.0, 1)
    assert base == [r.arrival_s for r in wl.requests]
    a1, a1b, a2 = (arrival_times(wl, 0.5, s) for s in (1, 1, 2))
    assert a1 == a1b and a1 != a2
    assert all(x <= y for x, y in itertools.pairwise(a1))  # trace order kept
    assert all(t >= s for t, s in zip(a1, base, strict=True))
    cfg = SimSettings(nodes=4, cache_blocks=2000, prefill_tokens_per_s=12000)
    plain = simulate(wl, build_policy("round_robin", prefill_tokens_per_s=12000), cfg)
    lagged = simulate(wl, build_policy("round_robin", prefill_tokens_per_s=12000),
                      dataclasses.replace(cfg, complete_lag_s=0.5))
    assert lagged.failed == plain.failed == 0 and lagged.node == plain.node
    assert lagged.cached_tokens == plain.cached_tokens
    ll = [simulate(wl, build_policy("least_loaded", prefill_tokens_per_s=12000),
                   dataclasses.replace(cfg, complete_lag_s=0.05, arrival_jitter_s=0.2), seed=s)
          for s in (0, 0)]
    assert ll[0].node == ll[1].node  # one seed, one replay


def test_a_stack_runs_measured_lags_and_node_names_are_replayed() -> None:
    """arrival_lags shift each request by its own lag (NaN = none) before the jitter, in trace
    order; node_ids name the simulated nodes, and session's ring maps keys by those names; a
    stack run's request timing puts each request on its engine at its measured arrival (TTFT
    from there, as the engine records it), decides it between schedule and engine arrival,
    and lets the router hear of it at the measured return."""
    from bench.agreement import stack_request_timing
    from bench.results import PolicyRun
    from bench.sim.backend import SimBackend
    from bench.sim.timing import RequestTiming, arrival_times

    wl = load_workload(workload="mooncake-sample", limit=60)
    n = len(wl.requests)
    lags = [0.0] * n
    lags[10], lags[20] = 3.0, math.nan
    out = arrival_times(wl, 0.0, 0, lags)
    base = [r.arrival_s for r in wl.requests]
    assert out[10] == base[10] + 3.0 and out[20] >= base[20]
    assert all(x <= y for x, y in itertools.pairwise(out))  # a late request delays later ones
    assert all(t >= s for t, s in zip(out, base, strict=True))
    try:
        arrival_times(wl, 0.0, 0, lags[:-1])
        raise AssertionError("a lag list of the wrong length must be refused")
    except ValueError as exc:
        assert "59 arrival lags for 60 requests" in str(exc)
    cfg = SimSettings(nodes=4, cache_blocks=2000, prefill_tokens_per_s=12000)
    names = ["engine-0", "engine-1", "engine-2", "engine-3"]
    runs = {ids: SimBackend(cfg, node_ids=ids).replay(wl, "session")
            for ids in (None, tuple(names))}
    assert runs[None].node_ids == [f"node-{i}" for i in range(4)]
    assert runs[tuple(names)].node_ids == names
    stack = PolicyRun("gateway:kv_aware", names, n, arrival_lag_by_request=[0.5] * n,
                      return_lag_by_request=[0.1] * n)
    got = stack_request_timing([stack, PolicyRun("round_robin", names, n)])
    assert set(got) == {"kv_aware", "*"}  # no lags: not listed
    assert list(got["*"].engine_lag_s) == [0.5] * n and list(got["*"].return_lag_s) == [0.1] * n
    plain = SimBackend(cfg).replay(wl, "round_robin")
    lagged = SimBackend(cfg, timing=got).replay(wl, "round_robin")  # via "*"
    # every request reaches its engine 0.5 s late: the same shifted schedule, the same TTFTs
    assert lagged.node == plain.node and lagged.cached_tokens == plain.cached_tokens
    assert lagged.ttft_s == pytest.approx(plain.ttft_s)
    assert all(s <= a <= s + 0.5 for a, s in zip(lagged.arrival_s, base, strict=True))
    assert RequestTiming([0.5] * n).decision_lags(1) != RequestTiming([0.5] * n).decision_lags(2)
    with pytest.raises(ValueError, match="59 engine lags for 60 requests"):
        SimBackend(cfg, timing={"*": RequestTiming([0.0] * (n - 1))}).replay(wl, "round_robin")


def test_replayed_engine_arrivals_may_overtake_and_return_lags_drive_load() -> None:
    """A request decided first but delayed on the way reaches its engine after a later one
    (the engine queues them in arrival order), and a measured return lag keeps a finished
    request in the router's in-flight count until it is heard."""
    from bench.sim.replay import simulate
    from bench.sim.timing import RequestTiming

    wl = Workload("t", 16, [_req(0, 0.0, (1, 2)), _req(1, 0.1, (3, 4))])
    one = SimSettings(nodes=1, cache_blocks=100, prefill_tokens_per_s=16.0, block_size=16,
                      max_batch=1)
    late_first = RequestTiming([1.0, 0.0])  # request 0 reaches the engine at 1.0, 1 at 0.1
    run = simulate(wl, build_policy("round_robin", prefill_tokens_per_s=16.0), one,
                   timing=late_first)
    assert run.failed == 0
    # request 1 was admitted first (at 0.1) and prefilled 32 tokens in 2 s; request 0 waited
    assert run.ttft_s[1] == pytest.approx(2.0)
    assert run.ttft_s[0] > 2.0
    two = SimSettings(nodes=2, cache_blocks=100, prefill_tokens_per_s=1000.0, block_size=16)
    wl2 = Workload("t", 16, [_req(0, 0.0, (1, 2)), _req(1, 10.0, (3, 4))])
    heard = [simulate(wl2, build_policy("least_loaded", prefill_tokens_per_s=1000.0), two,
                      timing=RequestTiming([0.0, 0.0], [back, back]))
             for back in (0.0, 100.0)]
    # request 0 finished long before request 1 arrives: heard at once, the router counts one
    # request in flight at request 1's decision; heard 100 s late, still two
    assert max(sum(c) for _, c in heard[1].load_samples) == 2
    assert max(sum(c) for _, c in heard[0].load_samples) == 1


def test_late_news_is_heard_after_the_lag_in_time_then_request_order() -> None:
    from bench.sim.late import LateNews

    heard: list[tuple[float, str]] = []
    late = LateNews(0.5, lambda at, what: heard.append((at, what)))
    late.tell(1.0, 7, "7 first half")
    late.tell(0.8, 9, "9")
    late.tell(1.0, 3, "3")
    late.tell(1.0, 7, "7 second half")
    late.hear_until(1.4)
    assert heard == [(1.3, "9")]
    late.hear_until(math.inf)
    assert heard[1:] == [(1.5, "3"), (1.5, "7 first half"), (1.5, "7 second half")]
    at_once = LateNews(0.0, lambda at, what: heard.append((at, what)))
    at_once.tell(2.0, 1, "now")
    assert heard[-1] == (2.0, "now")
    late.tell(3.0, 1, "measured", lag_s=0.25)  # a stack run's own lag for this request
    late.tell(3.0, 2, "default")
    late.hear_until(math.inf)
    assert heard[-2:] == [(3.25, "measured"), (3.5, "default")]
