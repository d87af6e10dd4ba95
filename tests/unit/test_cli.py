"""The kvroute command: subcommands exist, unfinished ones say so and fail."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from cli.client_args import env_name
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


def test_nodes_table_shows_the_index_state_and_why() -> None:
    from cli.cmd_nodes import format_table
    from kvroute.v1 import registry_pb2 as pb
    resp = pb.ListNodesResponse(block_size=16, replica_id="r", nodes=[
        pb.NodeInfo(node_id="a", index_state=pb.INDEX_STATE_COMPLETE, blocks_indexed=7,
                    offloaded_blocks_indexed=42),
        pb.NodeInfo(node_id="b", index_state=pb.INDEX_STATE_NO_EVENTS,
                    index_note="batches arrive with topic 'x' but --topic is 'y'"),
        pb.NodeInfo(node_id="c")])
    out = format_table(resp)
    assert "INDEX" in out.splitlines()[0] and "OFFLOADED" in out.splitlines()[0]
    assert out.splitlines()[1].split()[1:3] == ["7", "42"]  # address, model empty
    assert "b: index no_events: batches arrive with topic 'x'" in out
    assert out.splitlines()[1].rstrip().endswith("complete")
    assert out.splitlines()[3].rstrip().endswith("-")


CLIENT_COMMANDS = ("nodes", "route", "complete", "stats", "health")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    p: argparse.ArgumentParser = sub.choices[name]
    return p


@pytest.mark.parametrize("cmd", CLIENT_COMMANDS)
def test_every_client_flag_is_also_a_kvroute_variable(cmd: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flag of a client command (but route's prompt source) reads KVROUTE_<DEST>."""
    for key in [k for k in os.environ if k.startswith("KVROUTE_")]:
        monkeypatch.delenv(key)
    p = _subparser(build_parser(), cmd)
    grouped = {id(a) for g in p._mutually_exclusive_groups for a in g._group_actions}
    values = {}
    for a in p._actions:
        if not a.option_strings or a.dest == "help" or id(a) in grouped:
            continue
        assert f"[env {env_name(a.dest)}]" in (a.help or ""), a.dest
        if isinstance(a, argparse._StoreTrueAction):
            values[a.dest] = ("true", True)
        elif a.type in (int, float):
            values[a.dest] = ("7", a.type("7"))
        elif a.dest in ("router", "registry", "server"):
            values[a.dest] = ("127.0.0.1:1234", "127.0.0.1:1234")
        else:
            values[a.dest] = (f"v-{a.dest}", f"v-{a.dest}")
    for dest, (raw, _) in values.items():
        monkeypatch.setenv(env_name(dest), raw)
    source = ["--tokens", "1"] if cmd == "route" else []
    args = _subparser(build_parser(), cmd).parse_args(source)  # nothing else on the line
    for dest, (_, want) in values.items():
        assert getattr(args, dest) == want, dest
    # The command line wins over the variable.
    target = {"nodes": "--registry", "health": "--server"}.get(cmd, "--router")
    args = _subparser(build_parser(), cmd).parse_args([*source, target, "10.0.0.1:5"])
    assert getattr(args, target.lstrip("-")) == "10.0.0.1:5"


def test_an_unreadable_variable_names_itself(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVROUTE_JSON", "maybe")
    assert main(["nodes", "--registry", "127.0.0.1:1"]) == 2
    assert "KVROUTE_JSON: expected true or false, got 'maybe'" in capsys.readouterr().err
    monkeypatch.delenv("KVROUTE_JSON")
    monkeypatch.setenv("KVROUTE_TIMEOUT", "soon")
    assert main(["stats", "--router", "127.0.0.1:1"]) == 2
    assert "KVROUTE_TIMEOUT: cannot read 'soon' as float" in capsys.readouterr().err
