"""``kvroute demo``'s disaggregated comparison: the stack run against seeded sims that replay
its measured prefill engine arrivals (the sim side, fed a run shaped as the stack's), and
``scripts/demo_pd.py``'s checks of its flags."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bench.policies import build_policy
from bench.sim.pd_replay import PdRun, simulate_pd
from cli import cmd_demo
from engine_sim.params import transfer_s_per_block
from kvroute.errors import ConfigError
from router_service.disagg import DisaggSettings

ROOT = Path(__file__).resolve().parents[2]


def _demo_args(*flags: str) -> argparse.Namespace:
    top = argparse.ArgumentParser()
    cmd_demo.add_parser(top.add_subparsers())
    return top.parse_args(["demo", "--conversations", "6", "--sim-runs", "3", *flags])


def _stack_like(args: argparse.Namespace) -> tuple[Any, Any, PdRun]:
    """The notebook workload, its settings and a "stack" run: the in-process replay, measured
    on schedule at the engines."""
    wl = cmd_demo.notebook_workload(args)
    settings, _, _ = cmd_demo.setup(args, wl, args.time_scale, 1.0)
    run = simulate_pd(wl, build_policy("kv_aware",
                                       prefill_tokens_per_s=settings.prefill_tokens_per_s),
                      settings, 2, 2, transfer_s_per_block("seed", wl.block_size),
                      DisaggSettings(), label="gateway-pd:kv_aware/kv_aware")
    run.run.arrival_lag_by_request = [0.0] * len(wl.requests)
    return wl, settings, run


def _compare(args: argparse.Namespace, wl: Any, settings: Any, run: PdRun,
             heartbeat_s: float) -> tuple[dict[str, Any], str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = cmd_demo.disaggregated(args, wl, settings, {"results": []}, run, heartbeat_s)
    return report, out.getvalue()


def test_the_disaggregated_row_is_compared_with_sims_under_the_run_s_timing() -> None:
    args = _demo_args()
    wl, settings, run = _stack_like(args)
    report, text = _compare(args, wl, settings, run, 0.0)
    [row] = report["agreement"]
    assert row["policy"] == "kv_aware/kv_aware" and row["sim_runs"] == 3
    assert len(report["sim_runs"]) == 3 and report["sim_timing"]["heartbeat_delay_s"] == 0.0
    assert report["request_timing_replayed"] == ["kv_aware/kv_aware"]
    assert report["sim_timing"]["arrival_jitter_s"] == 0.0
    # no lag, no heartbeat: every seed replays the run itself
    assert row["agree"] and row["inside_range"]
    assert all(row[k]["apart"] == 0.0 for k in ("hit", "ttft_p50_ms", "ttft_p90_ms"))
    assert "stack vs sim" in text and "1 of 1 rows agree" in text
    # the mode line says what the sims replay, and what they do not
    assert "completions heard at once" in report["mode"]
    assert "sim:aggregated the exact schedule" in report["mode"]
    assert report["sim_timing"]["complete_lag_s"] == 0.0
    # measured lags are replayed: each seed draws its decision points, the figures move
    lags = [2.0 * (i % 3) for i in range(len(wl.requests))]
    run.run.arrival_lag_by_request = lags
    late, _ = _compare(args, wl, settings, run, 0.0)
    [row] = late["agreement"]
    assert row["ttft_p50_ms"]["apart"] != 0.0 or row["ttft_p90_ms"]["apart"] != 0.0
    # ... per request, not as a jitter of their median: seed 1 is exactly that replay, and the
    # table's sim row is seed 0 of the sims the agreement used
    from bench.pd_bench import run_strategies
    from bench.sim.timing import RequestTiming
    from router_service.policies.kv_aware import KvAwareSettings

    kv = KvAwareSettings(kv_prefill_tokens_per_s=settings.prefill_tokens_per_s)
    [want] = run_strategies(wl, settings, 2, 2, transfer_s_per_block("seed", wl.block_size), kv,
                            DisaggSettings(), ["kv_aware/kv_aware"], seed=1,
                            timing=RequestTiming(lags))
    [got] = late["sim_runs"][1]["results"]
    assert got["hit_rate_tokens"] == want["hit_rate_tokens"]
    assert got["ttft_ms"] == want["ttft_ms"]
    table = next(r for r in late["results"] if r["policy"] == "sim:kv_aware/kv_aware")
    assert table["ttft_ms"] == late["sim_runs"][0]["results"][0]["ttft_ms"]


def test_a_heartbeat_lag_moves_the_sims_off_the_live_view() -> None:
    """The agents' heartbeat (model seconds) lags the sims' cache view: with no arrival lag at
    all the sims no longer reproduce the run replayed with a live view, and the lag is in the
    report and the mode line (2 model s: the demo's 50 ms heartbeat at 40x)."""
    args = _demo_args()
    wl, settings, run = _stack_like(args)
    live, _ = _compare(args, wl, settings, run, 0.0)
    lagged, _ = _compare(args, wl, settings, run, 2.0)
    assert lagged["sim_timing"]["heartbeat_delay_s"] == 2.0 and "2 s heartbeat" in lagged["mode"]

    def sim_row(report: dict[str, Any]) -> tuple[float, float]:
        r = next(r for r in report["results"] if r["policy"] == "sim:kv_aware/kv_aware")
        return r["hit_rate_tokens"], r["ttft_ms"]["p90"]

    assert sim_row(lagged) != sim_row(live)  # the PD sims decide on a lagging view
    [row] = lagged["agreement"]
    assert any(row[k]["apart"] != 0.0 for k in ("hit", "ttft_p50_ms", "ttft_p90_ms"))


def test_a_disaggregated_fleet_needs_two_engines() -> None:
    assert cmd_demo.pd_split(4) == (2, 2) and cmd_demo.pd_split(5) == (2, 3)
    with pytest.raises(ConfigError, match="--nodes 1: a disaggregated fleet needs >= 2"):
        cmd_demo.pd_split(1)


def _demo_pd() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_pd", ROOT / "scripts" / "demo_pd.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("flags", "message"), [
    (["--runs", "0"], "--runs 0: give N >= 1"),
    (["--runs", "-3"], "--runs -3: give N >= 1"),
    (["--nodes", "1"], "--nodes 1: a disaggregated fleet needs >= 2 engines"),
    (["--time-scale", "0"], "--time-scale"),
])
def test_demo_pd_refuses_bad_flags_before_starting_anything(
        flags: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _demo_pd().main([*flags, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_pd_help_lists_its_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _demo_pd().main(["-h"])
    text = capsys.readouterr().out
    assert "--runs N" in text and "--tag T" in text and "--nodes" in text


def test_demo_pd_rows_write_null_for_failed_requests() -> None:
    args = _demo_args()
    _, _, run = _stack_like(args)
    run.run.arrival_lag_by_request[0] = math.nan
    run.run.ttft_s[1] = math.nan
    rows = _demo_pd()._rows(run)
    assert rows[0]["lag"] is None and rows[1]["ttft"] is None
    assert rows[2]["lag"] == 0.0 and rows[2]["ttft"] is not None
