"""``--repeat N`` for disaggregated comparisons: each row's mean and spread over the runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.pd_repeats import format_repeats, summarize
from cli.main import main


def _row(policy: str, hit: float, p90: float, blocks: int,
         lag_p99_ms: float | None = None) -> dict[str, Any]:
    return {"policy": policy, "hit_rate_tokens": hit, "ttft_ms": {"p50": p90 / 2, "p90": p90},
            "transferred_blocks": blocks, "decode_held_rate_tokens": 0.05,
            "arrival_lag_ms": {"p50": 100.0,
                               "p99": hit * 10_000 if lag_p99_ms is None else lag_p99_ms}}


def test_mean_sd_and_range_of_rows_present_in_every_run() -> None:
    runs = [[_row("stack-pd:kv_aware/kv_aware", 0.13, 17000.0, 39600, lag_p99_ms=900.0),
             _row("peer-pd:vllm-router", 0.14, 20000.0, 40100),
             _row("sim:kv_aware/kv_aware", 0.2, 1.0, 1)],
            [_row("stack-pd:kv_aware/kv_aware", 0.14, 18000.0, 39800),
             _row("sim:kv_aware/kv_aware", 0.2, 1.0, 1)],
            [_row("stack-pd:kv_aware/kv_aware", 0.15, 19000.0, 39700),
             _row("peer-pd:vllm-router", 0.12, 21000.0, 39900)]]
    s = summarize(runs)
    assert s["runs"] == 3
    assert list(s["rows"]) == ["stack-pd:kv_aware/kv_aware"]  # the peer missed run 2; no sim:
    kv = s["rows"]["stack-pd:kv_aware/kv_aware"]
    assert kv["hit_rate_tokens"]["mean"] == 0.14 and kv["hit_rate_tokens"]["sd"] == 0.01
    assert (kv["hit_rate_tokens"]["min"], kv["hit_rate_tokens"]["max"]) == (0.13, 0.15)
    assert kv["ttft_p90_ms"]["per_run"] == [17000.0, 18000.0, 19000.0]
    assert kv["transferred_blocks"]["mean"] == 39700 and kv["transferred_blocks"]["sd"] == 100
    assert kv["arrival_lag_p99_ms"]["max"] == 1500.0  # the worst run's lag
    assert kv["hit_rate_tokens"]["n"] == 3
    # the bench's contention rule (lag p99 > 1 s): runs 2 and 3 (1.4 s, 1.5 s) are marked
    assert kv["contended_runs"] == [2, 3]
    table = format_repeats(s)
    assert "over 3 runs" in table and "0.1400 ±0.0100 [0.1300..0.1500]" in table
    assert "* run 2, 3 contention-bound" in table
    assert "18.00 ±1.00 [17.00..19.00]" in table and "39,700 ±100 [39,600..39,800]" in table
    assert summarize([]) == {"runs": 0, "rows": {}} and format_repeats(summarize([])) == ""


def test_a_missing_metric_is_none_not_a_crash() -> None:
    row = {"policy": "stack-pd:round_robin/round_robin", "hit_rate_tokens": 0.05,
           "ttft_ms": {"p50": 1.0, "p90": 2.0}}
    s = summarize([[row], [row]])
    m = s["rows"]["stack-pd:round_robin/round_robin"]
    assert m["transferred_blocks"]["mean"] is None and m["transferred_blocks"]["n"] == 0
    assert m["contended_runs"] == []  # no arrival lag (a sim row): never contention-bound
    # a value in only one run: no spread (None, printed "-"), not a spread of 0
    other = dict(row, transferred_blocks=100)
    one = summarize([[row], [other]])["rows"]["stack-pd:round_robin/round_robin"]
    blocks = one["transferred_blocks"]
    assert blocks["n"] == 1 and blocks["mean"] == 100 and blocks["sd"] is None
    # runs without a value are null in the JSON (strict JSON: no NaN)
    assert blocks["per_run"] == [None, 100.0]
    assert json.loads(json.dumps(one, allow_nan=False)) == one
    table = format_repeats(summarize([[row], [other]]))
    assert "100 ±- [100..100]" in table


def test_sim_repeat_replays_the_strategies_with_successive_seeds(tmp_path: Path) -> None:
    out = tmp_path / "pd.json"
    assert main(["bench", "--workload", "mooncake-sample", "--limit", "150", "--no-progress",
                 "--prefill-nodes", "2", "--decode-nodes", "1", "--json", str(out),
                 "--arrival-jitter-s", "2.0", "--repeat", "3",
                 "--pd-strategies", "kv_aware/kv_aware,round_robin/round_robin"]) == 0
    rep = json.loads(out.read_text())
    rows = rep["repeats"]["rows"]
    assert rep["repeats"]["runs"] == 3 and set(rows) == {"pd:kv_aware/kv_aware",
                                                          "pd:round_robin/round_robin"}
    kv = rows["pd:kv_aware/kv_aware"]
    assert kv["hit_rate_tokens"]["per_run"][0] == rep["results"][0]["hit_rate_tokens"]
    # run k is the single run with --seed k (seeded arrival jitter)
    one = tmp_path / "seed1.json"
    assert main(["bench", "--workload", "mooncake-sample", "--limit", "150", "--no-progress",
                 "--prefill-nodes", "2", "--decode-nodes", "1", "--json", str(one),
                 "--arrival-jitter-s", "2.0", "--seed", "1",
                 "--pd-strategies", "kv_aware/kv_aware,round_robin/round_robin"]) == 0
    seed1 = json.loads(one.read_text())["results"][0]
    assert kv["ttft_p90_ms"]["per_run"][1] == seed1["ttft_ms"]["p90"]
    assert kv["hit_rate_tokens"]["per_run"][1] == seed1["hit_rate_tokens"]
    assert kv["ttft_p90_ms"]["per_run"][1] != kv["ttft_p90_ms"]["per_run"][0]
    assert main(["bench", "--no-progress", "--prefill-nodes", "1", "--decode-nodes", "1",
                 "--repeat", "0"]) == 2
