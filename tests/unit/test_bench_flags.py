"""``kvroute bench [TARGET] --help`` keeps offering every flag it offered when the flags were
declared by hand (tests/golden/bench_flags.json, taken from that parser): same option strings
(old aliases included), defaults, types, metavars and choices. Flags added since are allowed.

After removing or changing a flag on purpose, rewrite the golden file:
``python -m tests.unit.test_bench_flags --write``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cli.main import build_parser

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "bench_flags.json"
SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction,
            argparse.BooleanOptionalAction)


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``bench`` itself (it carries the replay flags) and each target's subparser."""
    def sub(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices

    bench = sub(build_parser("bench"))["bench"]
    yield "bench", bench
    yield from sub(bench).items()


def _describe(a: argparse.Action) -> dict[str, Any]:
    if isinstance(a, SWITCHES):  # a switch: present or not (dest and stored value are inner)
        return {"switch": True}
    return {"default": repr(a.default), "type": getattr(a.type, "__name__", repr(a.type)),
            "nargs": a.nargs, "metavar": a.metavar,
            "choices": list(a.choices) if a.choices else None}


def flags() -> dict[str, dict[str, dict[str, Any]]]:
    """Target -> option string -> what the flag is."""
    return {name: {s: _describe(a) for a in p._actions for s in a.option_strings}
            for name, p in _parsers()}


def test_every_bench_flag_is_still_offered_unchanged() -> None:
    golden = json.loads(GOLDEN.read_text())
    now = flags()
    for target, want in golden.items():
        where = "kvroute bench" if target == "bench" else f"kvroute bench {target}"
        assert target in now, f"{where}: target gone"
        for flag, spec in want.items():
            assert flag in now[target], f"{where}: {flag} gone"
            assert now[target][flag] == spec, f"{where} {flag}: changed"


def test_help_renders() -> None:
    for _, p in _parsers():
        assert "--json" in p.format_help()


def _golden_text(data: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per flag (small diffs when a flag changes)."""
    targets = []
    for target in sorted(data):
        rows = ",\n".join(f"  {json.dumps(flag)}: {json.dumps(spec, sort_keys=True)}"
                           for flag, spec in sorted(data[target].items()))
        targets.append(f" {json.dumps(target)}: {{\n{rows}\n }}")
    return "{\n" + ",\n".join(targets) + "\n}\n"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(_golden_text(flags()))
