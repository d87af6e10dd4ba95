"""``kvroute bench --mode stack``: the replay through real processes agrees with ``--mode sim``.

Starts real etcd, registry, router, node agents and engine_sim processes (via the bench itself),
replays a workload under two policies, and checks every request was served, the numbers came
from the engines, and the hit rates match the in-process simulation within a few points.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from bench.sim.timing import RequestTiming
from cli.main import main

pytestmark = pytest.mark.integration

COMMON = ["--workload", "conversations", "--limit", "120", "--nodes", "2", "--cache-blocks",
          "2500", "--no-progress"]


def test_stack_replay_matches_sim(tmp_path: Path) -> None:
    stack_json, sim_json = tmp_path / "stack.json", tmp_path / "sim.json"
    assert main(["bench", *COMMON, "--policies", "kv_aware,round_robin", "--mode", "sim",
                 "--json", str(sim_json)]) == 0
    assert main(["bench", *COMMON, "--policies", "kv_aware,gateway:kv_aware,round_robin",
                 "--mode", "stack", "--time-scale", "0.05", "--sim-runs", "3",
                 "--workdir", str(tmp_path / "stack"), "--json", str(stack_json)]) == 0
    stack, sim = json.loads(stack_json.read_text()), json.loads(sim_json.read_text())
    assert stack["mode"] == "stack" and sim["mode"] == "sim"
    # the stack measured its own timing, and the sim replayed it (3 seeds) for the agreement
    timing = stack["sim_timing"]
    assert timing["heartbeat_delay_s"] > 0 and timing["arrival_jitter_s"] >= 0
    agree = {r["policy"]: r for r in stack["agreement"]}
    assert set(agree) == {"kv_aware", "gateway:kv_aware", "round_robin"}
    for r in agree.values():
        assert r["sim_runs"] == 3 and abs(r["hit"]["apart"]) < 0.08
    for r in stack["results"]:
        assert r["return_lag_ms"] is not None and len(r["load_avg_1m"]) == 2
        assert r["contention_bound"] in (True, False)
    by_policy = {r["policy"]: r for r in stack["results"]}
    sim_by_policy = {r["policy"]: r for r in sim["results"]}
    for name in ("kv_aware", "gateway:kv_aware", "round_robin"):
        row = by_policy[name]
        assert row["failed"] == 0
        assert row["ttft_ms"]["p50"] > 0
        # engine-measured hit rate of the stack vs the simulation of the same workload
        sim_row = sim_by_policy[name.removeprefix("gateway:")]
        assert abs(row["hit_rate_tokens"] - sim_row["hit_rate_tokens"]) < 0.08
    assert by_policy["kv_aware"]["hit_rate_tokens"] > by_policy["round_robin"]["hit_rate_tokens"]


def test_disaggregated_stack_replay_matches_sim(tmp_path: Path) -> None:
    """Agents register prefill/decode roles, the router answers pairs, the replay prefills then
    decodes over vLLM's kv_transfer_params; the decode engines receive and keep the KV."""
    out = tmp_path / "pd.json"
    assert main(["bench", "--workload", "conversations", "--limit", "80", "--cache-blocks",
                 "2500", "--no-progress", "--mode", "stack", "--time-scale", "0.05",
                 "--prefill-nodes", "1", "--decode-nodes", "2",
                 "--pd-strategies", "kv_aware/kv_aware", "--workdir", str(tmp_path / "stack"),
                 "--sim-runs", "2", "--repeat", "2", "--pd-gateway", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    by = {r["policy"]: r for r in rep["results"]}
    stack, sim = by["stack-pd:kv_aware/kv_aware"], by["sim:kv_aware/kv_aware"]
    gw = by["gateway-pd:kv_aware/kv_aware"]  # --pd-gateway: the same fleet through the gateway
    assert gw["failed"] == 0 and sum(gw["requests_per_decode_node"]) == 80
    assert gw["transferred_blocks"] > 0
    assert abs(gw["hit_rate_tokens"] - sim["hit_rate_tokens"]) < 0.08
    # --repeat 2: two fresh fleets; the table is run 1, the spread covers both
    assert rep["repeats"]["runs"] == 2
    assert list(rep["repeats"]["rows"]) == [stack["policy"], gw["policy"]]
    hits = rep["repeats"]["rows"][stack["policy"]]["hit_rate_tokens"]
    assert hits["per_run"][0] == stack["hit_rate_tokens"] and len(hits["per_run"]) == 2
    assert (tmp_path / "stack" / "run-2" / "stack-pd").is_dir()
    # run 1 replays the rows in order (run 2 in reverse: ABBA); each row notes its place
    assert "replayed 1 of 2 on this fleet" in stack["notes"]
    assert "replayed 2 of 2 on this fleet" in gw["notes"]
    assert stack["failed"] == 0 and stack["ttft_ms"]["p50"] > 0
    assert sum(stack["requests_per_decode_node"]) == 80
    assert stack["transferred_blocks"] > 0 and stack["decode_held_rate_tokens"] > 0
    assert abs(stack["hit_rate_tokens"] - sim["hit_rate_tokens"]) < 0.08
    assert abs(stack["decode_held_rate_tokens"] - sim["decode_held_rate_tokens"]) < 0.15
    assert stack["arrival_lag_ms"]["p50"] >= 0  # measured at the prefill engines
    assert stack["return_lag_ms"]["p50"] > 0  # prefill answer -> release acknowledged
    assert rep["sim_timing"]["complete_lag_s"] == round(stack["return_lag_ms"]["p50"] / 1000, 4)
    # --sim-runs: the stack row against seeded sims under the timing it measured
    [row] = rep["agreement"]
    assert row["policy"] == "kv_aware/kv_aware" and row["sim_runs"] == 2
    assert rep["sim_timing"]["heartbeat_delay_s"] > 0 and len(rep["sim_runs"]) == 2


def test_disaggregated_replay_through_the_gateway(tmp_path: Path) -> None:
    """What ``kvroute demo`` runs disaggregated: every request to the OpenAI gateway, which
    decides the pair and hands the KV over (vLLM's kv_transfer_params); engine records. The
    demo starts the fleet on a helper thread (:class:`bench.fleet_pool.FleetPool`) while it
    computes, and stops it there: the pool's close leaves no process behind."""
    from bench.fleet_pool import FleetPool
    from bench.pd_bench import pd_metrics
    from bench.prompts import prepare
    from bench.stack_fleet import FleetSpec
    from bench.stack_pd_gateway import pd_router_flags, replay_gateway_pd
    from bench.workloads import load_workload
    from router_service.disagg import DisaggSettings

    wl = load_workload(workload="conversations", limit=60)
    spec = FleetSpec(nodes=3, cache_blocks=2500, block_size=wl.block_size, time_scale=0.05,
                     roles=("prefill", "decode", "decode"),
                     router_args=pd_router_flags(DisaggSettings(), 0.05))
    with FleetPool() as pool:
        coming = pool.start(tmp_path / "pd", spec)
        prompts = prepare(wl)  # (computed while the fleet starts)
        up = coming.result(timeout=120)
        assert up.start_s > 0
        run = replay_gateway_pd(up.backend, wl, 1, prompts)
        m = pd_metrics(run)
        pool.stop(up.backend)
    assert not up.backend.fleet._procs and up.backend.fleet.etcd is None  # all stopped
    assert m["failed"] == 0 and sum(m["requests_per_decode_node"]) == 60
    assert m["transferred_blocks"] > 0 and m["hit_rate_tokens"] > 0
    # each request's measured prefill engine arrival, for the demo's sims to replay: one
    # finite, non-negative lag per request (none failed, so none is NaN), in request order —
    # the same values the row's arrival-lag percentiles summarise
    lags = run.run.arrival_lag_by_request
    assert len(lags) == len(wl.requests) == 60
    assert all(math.isfinite(x) and x >= 0 for x in lags)
    assert run.run.arrival_lag_s == lags
    p50, p99 = np.percentile(np.array(lags) * 1000.0, [50, 99])
    assert m["arrival_lag_ms"]["p50"] == round(float(p50), 1)
    assert m["arrival_lag_ms"]["p99"] == round(float(p99), 1)
    timing = RequestTiming(lags)
    timing.check(len(wl.requests))  # what the demo's sims take
    assert all(0.0 <= d <= lag for d, lag in zip(timing.decision_lags(0), lags, strict=True))


def test_stack_spreads_over_router_and_gateway_replicas_that_share_their_view(
        tmp_path: Path) -> None:
    """``--routers 2 --gateways 2``: every policy through one replica and as POLICY@2 over
    both (Route and Complete spread independently, like a Service); the replicas share their
    view through the registry (each applied the other's deltas) and nothing fails."""
    out = tmp_path / "replicas.json"
    assert main(["bench", *COMMON, "--policies", "kv_aware", "--mode", "stack",
                 "--time-scale", "0.05", "--routers", "2", "--gateways", "2",
                 "--workdir", str(tmp_path / "stack"), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    by = {r["policy"]: r for r in rep["results"]}
    assert set(by) == {"kv_aware", "kv_aware@2", "gateway:kv_aware", "gateway:kv_aware@2"}
    for row in by.values():
        assert row["failed"] == 0 and row["ttft_ms"]["p50"] > 0
    assert rep["router_replicas"] == {"routers": 2, "gateways": 2, "spread": "random",
                                      "share_routes": True}
    logs = tmp_path / "stack" / "stack" / "logs"
    assert {p.name for p in logs.iterdir()} >= {"router.log", "router-1.log", "gateway.log",
                                                "gateway-1.log"}
    # each replay starts on fresh routers/gateways: POLICY@2 does not inherit POLICY's state
    assert abs(by["kv_aware@2"]["hit_rate_tokens"] - by["kv_aware"]["hit_rate_tokens"]) < 0.05
    for name in ("kv_aware@2", "gateway:kv_aware@2"):  # each replica applied the other's deltas
        note = next(n for n in by[name]["notes"] if n.startswith("shared view per replica"))
        applied = [int(a) for a in re.findall(r"deltas applied (\d+)", note)]
        published = [int(a) for a in re.findall(r"deltas published (\d+)", note)]
        assert len(applied) == len(published) == 2 and all(a > 0 for a in applied), note
        # what one applied, the other published (its own counter; some may still be in
        # flight when the bench reads the pages, none applied twice or made up)
        assert applied[0] <= published[1] and applied[1] <= published[0], note
        assert note.count("connected 1") == 2, note
        # ... and each replica's view staleness from its own histogram
        view = by[name]["replica_view"]["per_replica"]
        assert all(r["staleness_ms"]["p50_ms"] >= 0 for r in view)
    # the Router API rows also say how the replicas' decisions were spaced (client clock)
    assert "per_replica" in by["kv_aware@2"]["replica_view"]
    assert by["kv_aware@2"]["replica_view"]["window_ms"] >= 0
    assert "burst_ticks" not in by["gateway:kv_aware@2"]["replica_view"]
