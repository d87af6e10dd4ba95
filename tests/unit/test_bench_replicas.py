"""``kvroute bench --mode sim --routers N``: replicas over one fleet, sharing or not (issue 19)."""

from __future__ import annotations

import dataclasses

import pytest

from bench.metrics import policy_metrics
from bench.policies import build_policy
from bench.sim.config import SimSettings
from bench.sim.replay import simulate
from bench.sim.replicas import ReplicaSettings, Spreader
from bench.workloads import load_workload
from bench.workloads.base import TraceRequest, Workload
from kvroute.errors import ConfigError
from router_service.policies.base import Policy


def _kv() -> Policy:
    return build_policy("kv_aware", prefill_tokens_per_s=6000.0)


def _run(rs: ReplicaSettings, limit: int = 400) -> dict[str, float]:
    wl = load_workload(trace=None, workload=None, seed=0, start=0, limit=limit).spread_ticks(3)
    cfg = SimSettings(nodes=4, cache_blocks=500, block_size=wl.block_size)
    run = simulate(wl, _kv(), cfg, replicas=rs, make_policy=_kv, seed=0)
    m = policy_metrics(run, merged_lru_hit=1.0, oracle_hit=1.0)
    return {"hit": m["hit_rate_tokens"], "p90": m["ttft_ms"]["p90"], "failed": m["failed"]}


def test_sharing_replicas_match_one_router_and_isolated_ones_do_not() -> None:
    one = _run(ReplicaSettings())
    shared = _run(ReplicaSettings(routers=4, share_delay_s=0.0))
    alone = _run(ReplicaSettings(routers=4, share_routes=False))
    assert one["failed"] == shared["failed"] == alone["failed"] == 0
    assert abs(shared["hit"] - one["hit"]) <= 0.01
    assert shared["p90"] <= one["p90"] * 1.1
    assert alone["p90"] > shared["p90"]


def test_staggered_replicas_wait_their_turn_in_raw_bursts_and_the_wait_counts() -> None:
    wl = load_workload(trace=None, workload=None, seed=0, start=0, limit=300)  # raw ticks
    cfg = SimSettings(nodes=4, cache_blocks=500, block_size=wl.block_size)
    runs = [simulate(wl, _kv(), cfg, replicas=ReplicaSettings(routers=4,
                                                              share_burst_stagger_s=st),
                     make_policy=_kv, seed=0) for st in (0.0, 0.006)]
    for run in runs:
        assert run.failed == 0
        assert run.arrival_s == [r.arrival_s for r in wl.requests]  # the trace's, not the turn's
    assert runs[0].node != runs[1].node  # the turns changed decisions
    # two rounds of 4 tiny requests at one instant, one per replica each round: in the second
    # the replicas know one another and are in a burst, so ranks 1..3 wait 1..3 turns, and
    # the user's TTFT includes the wait
    tiny = Workload("t", 16, [TraceRequest(f"r{i}", 0.0, (i,), 16, 1) for i in range(8)])
    rs = ReplicaSettings(routers=4, spread="round_robin", share_delay_s=0.0,
                         share_burst_stagger_s=0.008)
    run = simulate(tiny, _kv(), SimSettings(nodes=4, cache_blocks=50, block_size=16),
                   replicas=rs, make_policy=_kv, seed=0)
    ttft = sorted(run.ttft_s[4:])
    assert ttft[0] < 0.008 and ttft[1] >= 0.008 and ttft[2] >= 0.016 and ttft[3] >= 0.024
    assert max(simulate(tiny, _kv(), SimSettings(nodes=4, cache_blocks=50, block_size=16),
                        replicas=dataclasses.replace(rs, share_burst_stagger_s=0.0),
                        make_policy=_kv, seed=0).ttft_s) <= 0.008 + 1e-9


def test_one_replica_is_the_single_router_run() -> None:
    assert _run(ReplicaSettings(routers=1), 150) == _run(ReplicaSettings(routers=1,
                                                                         share_routes=False), 150)


def test_spreaders_pick_like_a_service() -> None:
    rr = Spreader(ReplicaSettings(routers=3, spread="round_robin"), 0)
    assert [rr.pick() for _ in range(5)] == [0, 1, 2, 0, 1]
    rnd = Spreader(ReplicaSettings(routers=3), 0)
    assert {rnd.pick() for _ in range(50)} == {0, 1, 2}


def test_replica_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        ReplicaSettings(routers=0)
    with pytest.raises(ValueError):
        ReplicaSettings(spread="hash")
    with pytest.raises(ValueError, match="make_policy"):
        simulate(Workload("t", 16, [TraceRequest("r0", 0.0, (1,), 16, 1)]), _kv(),
                 SimSettings(nodes=2, cache_blocks=10, block_size=16),
                 replicas=ReplicaSettings(routers=2))


def test_spread_ticks_spreads_same_instant_arrivals_over_the_tick() -> None:
    wl = Workload("t", 16, [TraceRequest(f"r{i}", t, (i,), 16, 1)
                            for i, t in enumerate([0.0, 0.0, 0.0, 3.0])])
    out = wl.spread_ticks(3.0)
    assert [r.arrival_s for r in out.requests] == [0.0, 1.0, 2.0, 3.0]
    assert wl.spread_ticks(0) is wl
    uni = wl.spread_ticks(3.0, "uniform", seed=1)
    times = [r.arrival_s for r in uni.requests]
    assert times == sorted(times) and all(0.0 <= t < 6.0 for t in times)
    assert sorted(r.request_id for r in uni.requests[:3]) == ["r0", "r1", "r2"]
    assert times == [r.arrival_s for r in wl.spread_ticks(3.0, "uniform", seed=1).requests]
    assert times != [r.arrival_s for r in wl.spread_ticks(3.0, "uniform", seed=2).requests]
    assert uni.meta["arrival_spread_shape"] == "uniform" and uni.name == "t~3s-uniform"
    with pytest.raises(ValueError, match="shape"):
        wl.spread_ticks(3.0, "poisson")


def test_arrival_ticks_tell_a_quantised_trace_from_spread_arrivals() -> None:
    from bench.runner import arrivals_note

    sample = load_workload(trace=None, workload=None, seed=0, start=0, limit=None)
    ticks = sample.arrival_ticks()  # the shipped Mooncake sample: ~3 s ticks
    assert ticks.quantised and 2.9 <= ticks.median_gap_s <= 3.1 and ticks.max_same > 10
    assert "replayed as they are" in arrivals_note(sample)
    spread = sample.spread_ticks(3.0)
    assert not spread.arrival_ticks().quantised
    assert "spread over 3 s (even" in arrivals_note(spread)
    gen = load_workload(trace=None, workload="system-prompt", seed=0, start=0, limit=500)
    assert not gen.arrival_ticks().quantised and gen.arrival_ticks().max_same == 1


def test_bench_share_measures_staleness_through_a_real_registry() -> None:
    import argparse
    import asyncio

    from bench.share_bench import _run

    for registries in (1, 2):  # 2: on a real etcd, every delta through the hubs' relay
        out = asyncio.run(_run(argparse.Namespace(routers=2, nodes=2, requests=40, rate=200.0,
                                                  hold_s=0.05, registries=registries)))
        assert out["deltas_applied"] == out["deltas_expected"] == 80
        assert 0 <= out["staleness_ms"]["p50"] <= out["staleness_ms"]["max"] < 5000
        assert out["remote_inflight_left"] == {"r0": 0, "r1": 0}


def test_stack_routers_get_the_burst_window_and_stagger_on_the_wall_clock() -> None:
    """The routers measure bursts and wait their turns in wall seconds; the stack's workload
    runs --time-scale times compressed, so model-second settings reach them x --time-scale."""
    from router_service.settings import RouterSettings

    rs = ReplicaSettings(routers=4, share_burst_window_s=0.01, share_burst_stagger_s=0.006,
                         share_burst_window_min_wall_s=0)
    flags = rs.share_flags(0.2)
    got = dict(zip(flags[1::2], flags[2::2], strict=True))
    assert flags[0] == "--share-routes"
    assert float(got["--share-burst-window-s"]) == pytest.approx(0.002)
    assert float(got["--share-burst-stagger-s"]) == pytest.approx(0.0012)
    assert got["--share-burst-coincidence"] == "0.5"  # a share: unitless
    assert got["--share-max-blocks"] == "64"  # a count
    RouterSettings(registry="127.0.0.1:1", share_routes=True,  # the router accepts them
                   share_burst_window_s=float(got["--share-burst-window-s"]),
                   share_burst_stagger_s=float(got["--share-burst-stagger-s"]))
    assert ReplicaSettings(share_routes=False).share_flags(0.2) == ()


def test_the_routers_burst_window_never_drops_below_the_wall_floor() -> None:
    """The window x --time-scale is floored at --share-burst-window-min-wall-s (the shared
    view's staleness is wall time: the trace's compression does not shrink it); a wider
    scaled window passes unchanged; the floor defaults to what a router runs by default."""
    from router_service.settings import RouterSettings

    def window(ts: float, **kw: float) -> float:
        flags = ReplicaSettings(routers=4, **kw).share_flags(ts)
        return float(flags[flags.index("--share-burst-window-s") + 1])

    assert ReplicaSettings().share_burst_window_min_wall_s == \
        RouterSettings(registry="127.0.0.1:1").share_burst_window_s == 0.01
    assert window(0.2) == pytest.approx(0.01)  # 0.01 model s x 0.2 = 2 ms -> the 10-ms floor
    assert window(1.0) == pytest.approx(0.01)  # real time: the router's own default
    assert window(0.2, share_burst_window_s=0.2) == pytest.approx(0.04)  # above: scaled
    assert window(0.2, share_burst_window_min_wall_s=0.003) == pytest.approx(0.003)
    assert window(0.2, share_burst_window_min_wall_s=0) == pytest.approx(0.002)  # off
    # a stagger below the model window stays below the floored wall window (the router's rule)
    flags = ReplicaSettings(routers=4, share_burst_stagger_s=0.006).share_flags(0.2)
    got = dict(zip(flags[1::2], flags[2::2], strict=True))
    RouterSettings(registry="127.0.0.1:1", share_routes=True,
                   share_burst_window_s=float(got["--share-burst-window-s"]),
                   share_burst_stagger_s=float(got["--share-burst-stagger-s"]))
    with pytest.raises(ConfigError, match="share-burst-window-min-wall-s"):
        ReplicaSettings(share_burst_window_min_wall_s=-0.001)


def test_the_burst_window_read_back_is_the_one_argparse_uses() -> None:
    from bench.stack_backend import last_flag_value

    flag = "--share-burst-window-s"
    assert last_flag_value([flag, "0.01", "--x", "1", flag, "0.002"], flag) == "0.002"
    assert last_flag_value([flag, "0.01", f"{flag}=0.003"], flag) == "0.003"
    assert last_flag_value([f"{flag}=0.003", flag, "0.004"], flag) == "0.004"
    assert last_flag_value(["--x", "1"], flag) is None
    assert last_flag_value([flag], flag) is None  # no value: argparse would have refused


def test_stack_replays_the_replicas_after_one_router_unless_asked_first() -> None:
    """--routers / --gateways N pair every policy with POLICY@N; --replicas-first swaps the
    pair's order (to see whether replaying second on the same fleet favours a policy)."""
    import argparse

    from bench.cli_stack import _with_replicas
    from bench.stack_fleet import FleetSpec

    def names(**kw: object) -> list[str]:
        ns = argparse.Namespace(routers=4, spread="random", share_routes=True,
                                share_delay_s=0.005, share_max_blocks=64,
                                share_burst_window_s=0.01, share_burst_window_min_wall_s=0.01,
                                share_burst_coincidence=0.5,
                                share_burst_stagger_s=0.0, calibrate=True, time_scale=0.2,
                                gateways=1, **kw)
        return _with_replicas(ns, FleetSpec(), ["kv_aware", "round_robin"])[1]

    assert names() == ["kv_aware", "kv_aware@4", "round_robin", "round_robin@4"]
    assert names(replicas_first=True) == ["kv_aware@4", "kv_aware", "round_robin@4",
                                          "round_robin"]
