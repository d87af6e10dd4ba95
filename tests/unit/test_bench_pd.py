"""The disaggregated replay: pairs through the core, KV handed over, TTFT split, baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.pd_bench import PD_STRATEGIES, pd_metrics, run_pd
from bench.policies import build_policy
from bench.runner import resolve_settings
from bench.sim.config import SimSettings
from bench.sim.pd_replay import PdRun, simulate_pd
from bench.workloads import load_workload
from bench.workloads.base import TraceRequest, Workload
from cli.main import main
from router_service.disagg import DisaggSettings
from router_service.policies.kv_aware import KvAwareSettings


def _conversation() -> Workload:
    """Two turns of one conversation: turn 2 extends turn 1's prompt by 2 blocks."""
    t1 = TraceRequest("t1", 0.0, tuple(range(1, 9)), 8 * 16, 4)
    t2 = TraceRequest("t2", 5.0, tuple(range(1, 11)), 10 * 16, 4)
    return Workload("conv", 16, [t1, t2])


def test_follow_up_goes_to_the_decode_node_holding_the_conversation() -> None:
    cfg = SimSettings(nodes=4, cache_blocks=64, block_size=16, prefill_tokens_per_s=1000.0,
                      decode_s_per_token=0.01)
    pol = build_policy("kv_aware", prefill_tokens_per_s=1000.0)
    pd = simulate_pd(_conversation(), pol, cfg, 2, 2, 0.001, DisaggSettings())
    run = pd.run
    assert run.failed == 0 and pd.decode_node[0] == pd.decode_node[1] >= 2
    assert pd.transfer_blocks == [8, 2]  # the follow-up receives only its new blocks
    assert pd.decode_held_tokens[1] == 8 * 16
    # TTFT = queue + prefill + transfer, and the prefill engine served turn 1's blocks
    for i in range(2):
        assert math.isclose(run.ttft_s[i], pd.queue_s[i] + pd.prefill_s[i] + pd.transfer_s[i],
                            abs_tol=1e-9)
    assert run.cached_tokens[1] == 8 * 16 and pd.prefill_s[1] < pd.prefill_s[0]
    m = pd_metrics(pd)
    assert m["transferred_blocks"] == 10 and m["requests_per_decode_node"].count(2) == 1


def test_the_stack_s_timing_arrival_jitter_and_complete_lag() -> None:
    """As the aggregated sim: arrivals shift by a seeded draw (never out of order) and the
    router hears of each half's end ``complete_lag_s`` late; nothing is left in flight."""
    cfg = SimSettings(nodes=4, cache_blocks=64, block_size=16, prefill_tokens_per_s=1000.0,
                      decode_s_per_token=0.01, arrival_jitter_s=0.5, complete_lag_s=0.2,
                      heartbeat_delay_s=0.3)
    pol = build_policy("kv_aware", prefill_tokens_per_s=1000.0)
    runs = [simulate_pd(_conversation(), pol if k == 0 else
                        build_policy("kv_aware", prefill_tokens_per_s=1000.0), cfg, 2, 2,
                        0.001, DisaggSettings(), seed=k) for k in (0, 0, 1)]
    first, again, other = (r.run.arrival_s for r in runs)
    assert first == again != other  # seeded
    assert 0.0 <= first[0] < 0.5 and 5.0 <= first[1] < 5.5
    assert all(r.run.failed == 0 for r in runs)
    assert sum(pd_metrics(runs[0])["requests_per_decode_node"]) == 2


def test_measured_prefill_engine_arrivals_are_replayed() -> None:
    """A stack run's per-request lags (:class:`RequestTiming`): each request reaches its prefill
    engine as measured, is decided at a seeded point between schedule and that arrival, and
    its TTFT counts from the engine arrival, as the stack's records do; zero lags replay the
    schedule exactly."""
    from bench.sim.timing import RequestTiming

    one = TraceRequest("a", 0.0, tuple(range(1, 9)), 8 * 16, 4)
    other = TraceRequest("b", 0.5, tuple(range(20, 28)), 8 * 16, 4)
    w = Workload("two", 16, [one, other])
    cfg = SimSettings(nodes=2, cache_blocks=64, block_size=16, prefill_tokens_per_s=100.0,
                      decode_s_per_token=0.01)

    def replay(timing: RequestTiming | None, seed: int = 0) -> PdRun:
        return simulate_pd(w, build_policy("kv_aware", prefill_tokens_per_s=100.0), cfg, 1,
                           1, 0.001, DisaggSettings(), seed=seed, timing=timing)

    exact = replay(None)
    assert replay(RequestTiming([0.0, 0.0])).run.ttft_s == exact.run.ttft_s
    assert exact.queue_s[1] > 0 and exact.queue_s[0] == 0.0  # b waits behind a's prefill
    late = replay(RequestTiming([1.0, 0.0]))  # a reached the engine 1 s late: b went first
    # (b is decided after a, as the gateway decides in the trace's order)
    assert late.run.arrival_s[0] == 1.0 and 0.5 <= late.run.arrival_s[1] < 1.0
    assert late.queue_s[1] == 0.0 and late.queue_s[0] > 0
    for i in range(2):  # from the engine arrival: the lag itself is not in the TTFT
        assert math.isclose(late.run.ttft_s[i], late.queue_s[i] + late.prefill_s[i]
                            + late.transfer_s[i], abs_tol=1e-9)
    assert late.run.failed == 0 and late.decode_node == [1, 1]


def _pd_case() -> tuple[Workload, SimSettings, KvAwareSettings, dict[str, Any]]:
    """The two-turn conversation on 2 + 2 small engines, and its kv_aware sim report."""
    w = _conversation()
    cfg = SimSettings(nodes=4, cache_blocks=64, block_size=16, prefill_tokens_per_s=1000.0,
                      decode_s_per_token=0.01)
    kv = KvAwareSettings(kv_prefill_tokens_per_s=1000.0)
    return w, cfg, kv, run_pd(w, cfg, 2, 2, 0.001, kv, DisaggSettings(), ["kv_aware/kv_aware"])


def test_pd_agreement_compares_the_stack_with_seeded_sims_under_its_timing() -> None:
    from bench.pd_bench import pd_agreement

    w, cfg, kv, sim = _pd_case()
    stack = dict(sim["results"][0], policy="stack-pd:kv_aware/kv_aware",
                 arrival_lag_ms={"p50": 10.0, "p99": 20.0})
    out = pd_agreement([stack, dict(stack, policy="vllm-router-pd:x/y")], w, cfg, 2, 2, 0.001,
                       kv, DisaggSettings(), ["kv_aware/kv_aware"], 0.5, 0.05, 3)
    assert out["sim_timing"] == {"arrival_jitter_s": 0.02, "complete_lag_s": 0.0,
                                 "heartbeat_delay_s": 0.1}
    [row] = out["agreement"]  # the peer has no sim of its own
    assert row["policy"] == "kv_aware/kv_aware" and row["sim_runs"] == 3
    assert row["hit"]["apart"] == 0.0
    # a strategy that names only the prefill policy decodes by --pd-decode-policy, as run_pd
    alone = pd_agreement([stack], w, cfg, 2, 2, 0.001, kv, DisaggSettings(), ["kv_aware"],
                         0.5, 0.05, 1)
    [row] = alone["agreement"]
    assert row["policy"] == "kv_aware/kv_aware" and row["hit"]["apart"] == 0.0
    # the prefill half's measured return lag is replayed as the sim's complete lag
    lagged = pd_agreement([dict(stack, return_lag_ms={"p50": 40.0, "p99": 90.0})], w, cfg, 2, 2,
                          0.001, kv, DisaggSettings(), ["kv_aware/kv_aware"], 0.5, 0.05, 1)
    assert lagged["sim_timing"]["complete_lag_s"] == 0.04
    assert out["request_timing_replayed"] == [] and out["sim_timing"]["arrival_jitter_s"] == 0.02


def test_pd_agreement_replays_measured_arrivals_per_request() -> None:
    """``timings`` (the demo's): each request reaches its prefill engine as measured instead of
    a uniform jitter; with no lag and no heartbeat every seed replays the run itself."""
    from bench.pd_bench import pd_agreement
    from bench.sim.timing import RequestTiming

    w, cfg, kv, sim = _pd_case()
    # the row's median lag (1 s) is not replayed as a uniform jitter: the lags are
    stack = dict(sim["results"][0], policy="stack-pd:kv_aware/kv_aware",
                 arrival_lag_ms={"p50": 1000.0, "p99": 2000.0})
    zero = RequestTiming([0.0] * len(w.requests))
    out = pd_agreement([stack], w, cfg, 2, 2, 0.001, kv, DisaggSettings(), ["kv_aware"], 1.0,
                       0.0, 3, timings={"kv_aware/kv_aware": zero})
    assert out["request_timing_replayed"] == ["kv_aware/kv_aware"]
    assert out["sim_timing"]["arrival_jitter_s"] == 0.0 and len(out["sim_runs"]) == 3
    [row] = out["agreement"]
    assert all(row[k]["apart"] == 0.0 for k in ("hit", "ttft_p50_ms", "ttft_p90_ms"))


def test_kv_aware_pairs_move_fewer_blocks_than_load_only_decode() -> None:
    w = load_workload(workload="conversations", seed=1, limit=400)
    s = resolve_settings(w, SimSettings(nodes=4))
    rep = run_pd(w, s, 2, 2, 0.0001, KvAwareSettings(kv_prefill_tokens_per_s=6000.0),
                 DisaggSettings(pd_transfer_s_per_block=0.0001), list(PD_STRATEGIES))
    by = {r["policy"]: r for r in rep["results"]}
    assert set(by) == {f"pd:{x}" for x in PD_STRATEGIES}
    assert all(r["failed"] == 0 for r in by.values())
    kv, load = by["pd:kv_aware/kv_aware"], by["pd:kv_aware/least_loaded"]
    assert kv["transferred_blocks"] < load["transferred_blocks"]
    assert kv["decode_held_rate_tokens"] > load["decode_held_rate_tokens"]
    assert rep["aggregated"]["policy"].startswith("aggregated:kv_aware")
    assert 0 < rep["bounds"]["prefill_merged_lru_hit_rate"] <= 1


def test_cli_runs_disaggregated_and_checks_its_flags(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "pd.json"
    assert main(["bench", "--workload", "conversations", "--limit", "150", "--no-progress",
                 "--prefill-nodes", "2", "--decode-nodes", "1", "--json", str(out),
                 "--pd-strategies", "kv_aware/kv_aware,vllm_pd/least_loaded"]) == 0
    rep = json.loads(out.read_text())
    assert rep["prefill_nodes"] == 2 and len(rep["results"]) == 2
    assert rep["results"][1]["policy"] == "pd:vllm_pd/least_loaded"
    assert main(["bench", "--no-progress", "--policies", "vllm_pd"]) == 2  # PD only
    assert rep["transfer_s_per_block"] > 0
    assert main(["bench", "--no-progress", "--prefill-nodes", "2"]) == 2
    assert main(["bench", "--no-progress", "--prefill-nodes", "1", "--decode-nodes", "1",
                 "--pd-strategies", "kv_aware/nope"]) == 2
    assert main(["bench", "--no-progress", "--prefill-nodes", "1", "--decode-nodes", "1",
                 "--transfer-s-per-block", "fast"]) == 2


def test_pd_gateway_is_refused_without_the_stack_or_without_prefill_nodes(
        capsys: pytest.CaptureFixture[str]) -> None:
    # --mode sim has no gateway process
    assert main(["bench", "--no-progress", "--prefill-nodes", "1", "--decode-nodes", "1",
                 "--pd-gateway"]) == 2
    assert "needs --mode stack" in capsys.readouterr().err
    # --mode stack without --prefill-nodes is aggregated: the flag would be silently ignored
    # (refused before any fleet starts)
    assert main(["bench", "--no-progress", "--mode", "stack", "--pd-gateway"]) == 2
    err = capsys.readouterr().err
    assert "--pd-gateway" in err and "--prefill-nodes P --decode-nodes D" in err
