"""Run-to-run spread of repeated stack comparisons."""

from __future__ import annotations

from typing import Any

import pytest

from bench.spread import format_spread, spread


def _rep(rows: list[tuple[str, float, float]]) -> dict[str, Any]:
    return {"results": [{"policy": p, "hit_rate_tokens": h,
                         "ttft_ms": {"p50": t / 2, "p90": t, "p99": 2 * t}} for p, h, t in rows]}


def test_spread_per_policy_and_target() -> None:
    a = _rep([("kv_aware", 0.165, 6000.0), ("peer:x", 0.170, 8000.0), ("only-a", 0.1, 1.0)])
    b = _rep([("kv_aware", 0.168, 6200.0), ("peer:x", 0.160, 8100.0)])
    out = spread([a, b])
    assert set(out) == {"kv_aware", "peer:x"}  # a policy missing from a run is skipped
    kv = out["kv_aware"]
    assert kv["hit_spread"] == pytest.approx(0.003)
    assert kv["ttft_p90_spread"] == pytest.approx(200 / 6000, abs=1e-4)
    assert kv["ttft_p90_ms"] == [6000.0, 6200.0] and kv["within_target"]
    assert not out["peer:x"]["within_target"]  # hit rates 0.010 apart
    text = format_spread(out)
    assert "kv_aware" in text and "3.3%" in text and "NO" in text
    assert spread([]) == {} and format_spread({}) == ""


def test_router_flags_convert_kv_aware_to_the_wall_clock() -> None:
    from bench.stack_fleet import router_flags
    from kvroute.settings import settings_flags
    from router_service.policies.kv_aware import KvAwareSettings

    kv = KvAwareSettings(kv_prefill_tokens_per_s=6000.0, kv_usage_penalty_s=0.5,
                         kv_eviction_cost_s=0.001)
    flags = router_flags(kv, 0.2)
    got: dict[str, str] = {}  # --flag value, or a bare --flag / --no-flag for a bool
    for i, tok in enumerate(flags):
        if tok.startswith("--"):
            nxt = flags[i + 1] if i + 1 < len(flags) else "--"
            got[tok] = "" if nxt.startswith("--") else nxt
    assert "--kv-prefill-only-backlog" in got  # bools pass as bare flags
    assert float(got["--kv-prefill-tokens-per-s"]) == pytest.approx(30_000.0)
    assert float(got["--kv-usage-penalty-s"]) == pytest.approx(0.1)
    assert float(got["--kv-eviction-cost-s"]) == pytest.approx(0.001 * 0.04)
    assert float(got["--kv-reuse-weight"]) == kv.kv_reuse_weight  # unitless: unchanged
    assert router_flags(kv, 1.0) == settings_flags(kv)  # at 1x: every setting as it is


def test_contention_bound_runs_are_marked_not_dropped() -> None:
    from bench.contention import CONTENTION_LAG_P99_S, contention_bound

    quiet = {"arrival_lag_ms": {"p50": 100.0, "p90": 200.0, "p99": 400.0}}
    busy = {"arrival_lag_ms": {"p50": 900.0, "p90": 4000.0,
                               "p99": CONTENTION_LAG_P99_S * 1000 + 1}}
    assert not contention_bound(quiet) and contention_bound(busy)
    assert not contention_bound({"arrival_lag_ms": None})  # sim rows have no lag
    a = _rep([("peer:x", 0.170, 8000.0)])
    b = _rep([("peer:x", 0.171, 9000.0)])  # 12.5 % apart, run 2 lagging
    c = _rep([("peer:x", 0.172, 8100.0)])
    b["results"][0]["contention_bound"] = True
    out = spread([a, b, c])["peer:x"]
    assert out["contended_runs"] == [2] and not out["within_target"]
    assert out["within_target_uncontended"] is True  # runs 1 and 3: 1.3 %, hit 0.002
    assert out["ttft_p90_ms"] == [8000.0, 9000.0, 8100.0]  # every run still reported
    assert "contention-bound: run 2; the other runs: yes" in format_spread({"peer:x": out})
    two = spread([a, b])["peer:x"]
    assert two["within_target_uncontended"] is None  # one clean run: no verdict of its own


def test_machine_sampler_reads_load_and_cpu() -> None:
    from bench.contention import MachineSampler

    s = MachineSampler()
    s.start()
    sum(i * i for i in range(200_000))
    (load0, load1), busy = s.stop()
    assert load0 >= 0 and load1 >= 0
    assert busy is None or 0.0 <= busy <= 1.0


def test_agreement_of_stack_and_sim_medians() -> None:
    from bench.agreement import agreement, format_agreement, stack_timing

    def row(policy: str, hit: float, p50: float, p90: float, **extra: Any) -> dict[str, Any]:
        return {"policy": policy, "hit_rate_tokens": hit,
                "ttft_ms": {"p50": p50, "p90": p90, "p99": 2 * p90}, **extra}

    lag = {"arrival_lag_ms": {"p50": 50.0, "p90": 90.0, "p99": 200.0},
           "return_lag_ms": {"p50": 20.0, "p90": 30.0, "p99": 40.0}}
    stack = {"results": [row("kv_aware", 0.115, 1700.0, 5000.0, **lag),
                         row("gateway:least_loaded", 0.069, 3300.0, 9400.0, **lag),
                         row("peer:x", 0.17, 1.0, 2.0, **lag)]}
    timing = stack_timing(stack, 0.2, 0.05)
    assert timing == {"arrival_jitter_s": 0.1, "complete_lag_s": 0.02,
                      "heartbeat_delay_s": 0.25}
    sims = [{"results": [row("kv_aware", h, 1750.0, 5100.0), row("least_loaded", ll, 3400.0,
                                                                     9800.0)]}
            for h, ll in ((0.114, 0.052), (0.117, 0.055), (0.110, 0.064))]
    out = {r["policy"]: r for r in agreement(stack, sims)}
    assert set(out) == {"kv_aware", "gateway:least_loaded"}  # no sim row: no verdict
    assert out["kv_aware"]["agree"] and out["kv_aware"]["hit"]["sim_median"] == 0.114
    ll = out["gateway:least_loaded"]
    assert not ll["agree"] and ll["hit"]["apart"] == 0.014  # 0.069 vs median 0.055
    assert ll["hit"]["sim_max"] == 0.064  # the range is shown, the bar is not widened
    # inside the sims' [min, max]: kv_aware's hit is, its p50 (1700 vs 1750 in every seed) not
    assert out["kv_aware"]["hit"]["inside_range"] and not out["kv_aware"]["inside_range"]
    assert not ll["inside_range"]
    text = format_agreement(list(out.values()))
    assert "0.055 [0.052-0.064]" in text and "NO" in text and "yes" in text
    assert "in range" in text and "as draw" in text
    # least_loaded's hit misses the bar, but by less than 2 sd of its own seeds' spread
    # (sd 0.0062 x sqrt(1 + pi / 6) x 2 = 0.015 > 0.014): a draw of the sim's distribution
    assert ll["hit"]["sim_sd"] == pytest.approx(0.0062, abs=1e-4)
    assert ll["as_draw"] and not ll["agree"] and out["kv_aware"]["as_draw"]
    assert "1 of 2 rows agree; 1 more within the sims' own spread (least_loaded hit" in text


def test_agreement_as_draw_is_never_narrower_than_the_bar() -> None:
    from bench.agreement import agreement, agreement_counts

    def row(policy: str, hit: float, p50: float = 100.0) -> dict[str, Any]:
        return {"policy": policy, "hit_rate_tokens": hit,
                "ttft_ms": {"p50": p50, "p90": 2 * p50, "p99": 3 * p50}}

    stack = {"results": [row("round_robin", 0.31), row("kv_aware", 0.40, 130.0),
                         row("session", 0.58)]}
    sims = [{"results": [row("round_robin", 0.30), row("kv_aware", 0.40 + d, 100.0 + d),
                         row("session", 0.60 + d)]} for d in (0.0, 0.0005, 0.001)]
    out = {r["policy"]: r for r in agreement(stack, sims)}
    # identical seeds (sd 0): the bar decides, also for as_draw
    assert out["round_robin"]["agree"] and out["round_robin"]["as_draw"]
    # p50 and p90 +30 %, seeds 0.5 % apart: not a draw of that distribution
    assert not out["kv_aware"]["agree"] and not out["kv_aware"]["as_draw"]
    assert not out["session"]["as_draw"]  # hit -0.0205 with sd 0.0005
    line = agreement_counts(list(out.values()))
    assert line == "1 of 3 rows agree; 2 outside it too (kv_aware p50/p90, session hit)"
    # two seeds give no sd: the bar alone
    two = agreement(stack, sims[:2])
    assert [r["as_draw"] for r in two] == [r["agree"] for r in two]


def test_divergence_names_nodes_by_first_use() -> None:
    from bench.spread import divergence, first_use_labels

    assert first_use_labels([5, 2, 5, -1, 7]) == [0, 1, 0, -1, 2]
    # run 2 only relabels the identical empty engines: no divergence
    same = divergence([[3, 1, 3, 0], [6, 2, 6, 4]])
    assert same == {"diverge_at": None, "same_decisions": 1.0}
    # request 2 goes to a fresh node in run 2, to request 0's node in run 1
    apart = divergence([[3, 1, 3, 0], [6, 2, 4, 2], [3, 1, 3, 1]])
    assert apart["diverge_at"] == 2 and apart["same_decisions"] == 0.5
    assert divergence([[1, 2]]) == {"diverge_at": None, "same_decisions": None}
    a = _rep([("peer:x", 0.170, 8000.0)])
    b = _rep([("peer:x", 0.171, 8100.0)])
    out = spread([a, b], [{"peer:x": [0, 1, 0]}, {"peer:x": [2, 0, 0]}])["peer:x"]
    assert out["diverge_at"] == 2 and out["same_decisions"] == pytest.approx(2 / 3, abs=1e-4)
    assert "67%" in format_spread({"peer:x": out})
    assert "diverge_at" not in spread([a, b])["peer:x"]  # no decisions given: not reported


def test_format_timing_names_the_sim_flags_and_defaults_a_missing_complete_lag() -> None:
    from bench.agreement import format_timing

    line = format_timing({"arrival_jitter_s": 0.5, "complete_lag_s": 0.12,
                          "heartbeat_delay_s": 1.0})
    assert line == ("sim with this run's timing (model s): --arrival-jitter-s 0.5 "
                    "--complete-lag-s 0.12 --heartbeat-delay-s 1.0")
    assert "--complete-lag-s 0.0 " in format_timing({"arrival_jitter_s": 0.5,
                                                     "heartbeat_delay_s": 1.0})
