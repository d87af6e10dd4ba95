"""``kvroute bench`` replay/sweep from the command line: table, JSON schema, plots, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main

SCHEMA_RESULT_KEYS = {"policy", "hit_rate_tokens", "hit_rate_requests",
                      "predicted_hit_rate_tokens", "ttft_ms", "e2e_ms", "throughput_rps",
                      "load_max_over_mean", "utilization", "evictions", "failed"}


def test_replay_writes_schema_and_plots(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    plots = tmp_path / "plots"
    rc = main(["bench", "--workload", "mooncake-sample", "--limit", "300", "--nodes", "4",
               "--policies", "kv_aware,round_robin,dynamo", "--json", str(out),
               "--plot-dir", str(plots), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "kv_aware" in text and "oracle" in text
    rep = json.loads(out.read_text())
    assert {"workload", "nodes", "cache_blocks", "model", "bounds", "results"} <= set(rep)
    assert set(rep["bounds"]) == {"oracle", "merged_lru", "random", "latency_floor"}
    for name in ("oracle", "merged_lru", "random"):
        assert 0 <= rep["bounds"][name]["hit_rate_tokens"] <= 1
    floor = rep["bounds"]["latency_floor"]
    assert 0 < floor["ttft_ms"]["p50"] <= floor["ttft_ms"]["p90"] <= floor["ttft_ms"]["p99"]
    assert "latency floor" in text
    assert [r["policy"] for r in rep["results"]] == ["kv_aware", "round_robin", "dynamo"]
    for r in rep["results"]:
        assert set(r) >= SCHEMA_RESULT_KEYS
        assert set(r["ttft_ms"]) == {"p50", "p90", "p99"} == set(r["e2e_ms"])
        assert r["ttft_ratio_to_floor"]["p90"] == pytest.approx(
            r["ttft_ms"]["p90"] / floor["ttft_ms"]["p90"], abs=0.01)
    assert rep["nodes"] == 4 and rep["cache_blocks"] > 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["hit_rate_running.png", "node_load.png", "predicted_vs_actual.png",
                     "ttft_cdf.png"]
    assert all((plots / n).stat().st_size > 10_000 for n in names)


def test_sweep_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.json"
    rc = main(["bench", "sweep", "--workload", "mooncake-sample", "--limit", "200",
               "--nodes", "2", "--policies", "kv_aware,random", "--sweep-fractions", "0.1,0.5",
               "--json", str(out), "--plot-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    sweep = json.loads(out.read_text())
    assert len(sweep["cache_blocks"]) == 2 and len(sweep["policies"]["kv_aware"]) == 2
    assert (tmp_path / "hit_rate_vs_cache.png").exists()
    assert main(["bench", "--mode", "stack", "--policies", "sglang", "--no-progress"]) == 2
    assert "run only in --mode sim" in capsys.readouterr().err
    # --policies '' means "the peers alone"; without --peers nothing would run
    assert main(["bench", "--mode", "stack", "--policies", "", "--limit", "10",
                 "--no-progress"]) == 2
    assert "replays nothing without --peers" in capsys.readouterr().err
    assert main(["bench", "--policies", "nope", "--no-progress"]) == 2
    assert main(["bench", "--trace", str(tmp_path / "missing.jsonl"), "--no-progress"]) == 2
