"""``kvroute bench decide``: JSON schema the scripts read, and bad flags exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main


def test_decide_writes_results_per_fleet_size(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.json"
    rc = main(["bench", "decide", "--nodes", "2,5", "--decisions", "30", "--documents", "8",
               "--blocks-per-node", "50", "--prompt-blocks", "8", "--json", str(out)])
    assert rc == 0
    assert "router decision p50" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert [r["nodes"] for r in rep["results"]] == [2, 5]
    for r in rep["results"]:
        assert {"nodes", "router_p50_us", "router_p99_us", "lookup_p50_us",
                "lookup_p99_us"} <= set(r)
        assert 0 < r["router_p50_us"] <= r["router_p99_us"]
        assert 0 < r["lookup_p50_us"] <= r["lookup_p99_us"]
    assert {"router_p50_ratio", "router_met", "lookup_p50_ratio", "lookup_met"} <= \
        set(rep["verdict"])


@pytest.mark.parametrize("flags", [["--nodes", "8,x"], ["--nodes", "0"], ["--decisions", "0"]])
def test_decide_rejects_bad_flags(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "decide", *flags]) == 2
    assert "--" in capsys.readouterr().err


def test_decide_without_the_garbage_collector_restores_it() -> None:
    import gc

    assert gc.isenabled()
    assert main(["bench", "decide", "--nodes", "2", "--decisions", "5", "--documents", "2",
                 "--blocks-per-node", "5", "--prompt-blocks", "2", "--no-gc"]) == 0
    assert gc.isenabled()
