"""The kvroute command: subcommands exist, unfinished ones say so and fail."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli.main import build_parser, main


def test_help_lists_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("serve", "nodes", "route", "demo", "bench"):
        assert cmd in out


@pytest.mark.parametrize("role", ["registry", "router", "agent", "engine-sim"])
def test_serve_roles_have_help(role: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", role, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_parser_builds() -> None:
    assert build_parser().prog == "kvroute"


def test_bench_hashing_reports_throughput(tmp_path: object, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    assert main(["bench", "hashing", "--prompt-tokens", "2000", "--prompts", "2"]) == 0
    assert "M tokens/s" in capsys.readouterr().out


def test_unknown_bench_target_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nonsense"]) == 2
    assert "unknown target" in capsys.readouterr().err


def test_bench_agent_reports_parse_rates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "agent", "--agent-seconds", "0.05"]) == 0
    assert "parse_and_map_events_per_s" in capsys.readouterr().out
