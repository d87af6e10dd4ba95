"""``kvroute demo``'s disaggregated comparison: the stack run against seeded sims that replay
its measured prefill engine arrivals (the sim side, fed a run shaped as the stack's)."""

from __future__ import annotations

import argparse
import contextlib
import io

from bench.policies import build_policy
from bench.sim.pd_replay import simulate_pd
from bench.workloads.generated import ConversationSpec, conversations
from cli import cmd_demo
from engine_sim.params import transfer_s_per_block
from router_service.disagg import DisaggSettings


def test_the_disaggregated_row_is_compared_with_sims_under_the_run_s_timing() -> None:
    top = argparse.ArgumentParser()
    cmd_demo.add_parser(top.add_subparsers())
    args = top.parse_args(["demo", "--conversations", "6", "--sim-runs", "3"])
    wl = conversations(0, ConversationSpec(conversations=6, turns=8, start_window_s=40.0,
                                           think_time_s=10.0))
    settings, _, _ = cmd_demo._setup(args, wl, args.time_scale, 1.0)
    # a "stack" run: the in-process replay, measured on schedule at the engines
    run = simulate_pd(wl, build_policy("kv_aware",
                                       prefill_tokens_per_s=settings.prefill_tokens_per_s),
                      settings, 2, 2, transfer_s_per_block("seed", wl.block_size),
                      DisaggSettings(), label="gateway-pd:kv_aware/kv_aware")
    run.run.arrival_lag_by_request = [0.0] * len(wl.requests)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = cmd_demo._disaggregated(args, wl, settings, {"results": []}, run, 0.0)
    [row] = report["agreement"]
    assert row["policy"] == "kv_aware/kv_aware" and row["sim_runs"] == 3
    assert len(report["sim_runs"]) == 2 and report["sim_timing"]["heartbeat_delay_s"] == 0.0
    # no lag, no heartbeat: every seed replays the run itself
    assert row["agree"] and row["inside_range"]
    assert all(row[k]["apart"] == 0.0 for k in ("hit", "ttft_p50_ms", "ttft_p90_ms"))
    assert "stack vs sim" in out.getvalue() and "1 of 1 rows agree" in out.getvalue()
    # measured lags are replayed: each seed draws its decision points, the figures move
    run.run.arrival_lag_by_request = [2.0 * (i % 3) for i in range(len(wl.requests))]
    with contextlib.redirect_stdout(io.StringIO()):
        late = cmd_demo._disaggregated(args, wl, settings, {"results": []}, run, 0.0)
    [row] = late["agreement"]
    assert row["ttft_p50_ms"]["apart"] != 0.0 or row["ttft_p90_ms"]["apart"] != 0.0
