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
    with pytest.raises(SystemExit) as exc:
        main(["bench", "nonsense"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nonsense'" in err and "hashing" in err


@pytest.mark.parametrize("target", ["replay", "sweep", "hashing", "router", "registry",
                                    "agent", "decide"])
def test_bench_targets_have_own_help(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", target, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"kvroute bench {target}" in out and "--json" in out
    # each target lists its own flags only
    assert ("--router-nodes" in out) == (target == "router")
    assert ("--registry-entries" in out) == (target == "registry")
    assert ("--sweep-fractions" in out) == (target == "sweep")


def test_bench_engine_flags_come_from_sim_settings() -> None:
    import dataclasses

    from bench.sim.config import SimSettings
    from kvroute.settings import flag_name

    args = build_parser().parse_args(["bench", "--nodes", "3", "--max-batch", "5"])
    assert args.run.__name__ == "run_replay" and args.nodes == "3" and args.max_batch == "5"
    sweep = build_parser().parse_args(["bench", "sweep", "--decode-s-per-token", "0.5"])
    for f in dataclasses.fields(SimSettings):
        assert hasattr(args, f.name) and hasattr(sweep, f.name), flag_name(f)
    assert sweep.decode_s_per_token == "0.5"


def test_bench_agent_reports_parse_rates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "agent", "--agent-seconds", "0.05"]) == 0
    assert "parse_and_map_events_per_s" in capsys.readouterr().out
