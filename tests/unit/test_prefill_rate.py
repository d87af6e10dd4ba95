"""Per-engine prefill rate calibration (issue 19): the estimator, engine_sim's counters, and the
sim's calibrated routers with a wrong --kv-prefill-tokens-per-s."""

from __future__ import annotations

import pytest

from bench.metrics import policy_metrics
from bench.policies import build_policy
from bench.sim.config import SimSettings
from bench.sim.replay import simulate
from bench.sim.replicas import ReplicaSettings
from bench.workloads import load_workload
from engine_sim.fleet import SimFleet
from engine_sim.model import SimRequest
from engine_sim.params import EngineParams
from kvroute.prefill_rate import PrefillRateEstimator


def test_estimator_measures_windows_smooths_and_survives_restarts() -> None:
    e = PrefillRateEstimator(min_window_s=1.0, smoothing=0.5)
    assert e.update(0, 0.0) == 0.0
    assert e.update(500, 0.5) == 0.0  # window too short yet
    assert e.update(4000, 1.0) == pytest.approx(4000.0)
    assert e.update(6000, 2.0) == pytest.approx(3000.0)  # halfway to the 2000 sample
    assert e.update(10, 0.01) == pytest.approx(3000.0)  # counters reset: new baseline
    assert e.update(3010, 1.01) == pytest.approx(3000.0)
    with pytest.raises(ValueError):
        PrefillRateEstimator(smoothing=0.0)


def test_unaligned_counters_need_a_longer_window_and_a_new_source_a_new_baseline() -> None:
    e = PrefillRateEstimator(min_window_s=1.0, unaligned_window_s=5.0)
    e.update(0, 0.0, aligned=False)
    assert e.update(4000, 2.0, aligned=False) == 0.0  # 2 s < 5 s: not closed
    assert e.update(10000, 5.0, aligned=False) == pytest.approx(2000.0)
    e.update(1e6, 5.0)  # switched to the aligned source: baseline, not a sample
    assert e.windows == 1
    with pytest.raises(ValueError):
        PrefillRateEstimator(min_window_s=2.0, unaligned_window_s=1.0)


def test_sim_engines_report_their_true_prefill_rate() -> None:
    fleet = SimFleet(1, EngineParams(prefill_tokens_per_s=1000.0, decode_s_per_token=0.01,
                                     max_running=4, capacity_blocks=1000, block_size=16))
    assert fleet.nodes[0].prefill_rate(0.0) == 0.0  # the first scrape is the baseline
    t = 0.0
    for i in range(40):
        fleet.submit(0, SimRequest.from_blocks(f"r{i}", list(range(i * 100, i * 100 + 20)),
                                               320, 5), t)
        t += 0.5
    fleet.advance(t + 100)
    m = fleet.nodes[0].model
    assert m.prefill_computed_tokens_total == 40 * 320
    assert m.prefill_seconds_total == pytest.approx(40 * 0.32)
    assert fleet.nodes[0].prefill_rate(t + 100) == pytest.approx(1000.0)


@pytest.mark.parametrize("factor", [1 / 3, 3.0])
def test_calibrated_kv_aware_does_not_care_about_a_wrong_flag(factor: float) -> None:
    wl = load_workload(trace=None, workload=None, seed=0, start=0, limit=600)
    cfg = SimSettings(nodes=4, cache_blocks=600, block_size=wl.block_size)

    def p90(rate: float, calibrate: bool) -> float:
        policy = build_policy("kv_aware", prefill_tokens_per_s=rate)
        run = simulate(wl, policy, cfg, None, rate, ReplicaSettings(calibrate=calibrate))
        return float(policy_metrics(run, 1.0, 1.0)["ttft_ms"]["p90"])

    right = p90(cfg.prefill_tokens_per_s, False)
    wrong = cfg.prefill_tokens_per_s * factor
    assert p90(wrong, True) <= right * 1.1
