"""Entry point of the ``kvroute`` command. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from cli import (
    cmd_bench,
    cmd_complete,
    cmd_demo,
    cmd_health,
    cmd_nodes,
    cmd_route,
    cmd_serve,
    cmd_stats,
)
from kvroute import __version__
from kvroute.errors import ConfigError

COMMANDS = (cmd_serve, cmd_nodes, cmd_route, cmd_complete, cmd_stats, cmd_health, cmd_demo,
            cmd_bench)

EXIT_BROKEN_PIPE = 141
"""Exit code when stdout's reader went away (``kvroute nodes | head``), as for SIGPIPE."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors belong to the (sub)command that has the bad flag.

    argparse hands a subcommand's unknown flags up to the top-level parser, which then prints
    the top-level usage; here the innermost command reports them itself, names the flag it
    would have accepted and points at its own ``--help``.
    """

    def parse_known_args(  # type: ignore[override]
            self, args: Sequence[str] | None = None,
            namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        # A chosen subcommand has reported its own extras already; here: this parser's own.
        chosen = [a.dest for a in self._actions if isinstance(a, argparse._SubParsersAction)
                  and getattr(ns, a.dest, None) is not None]
        if extras and not chosen:
            self.error(self._unrecognized(extras))
        return ns, extras

    def _unrecognized(self, extras: list[str]) -> str:
        flags = [s for a in self._actions for s in a.option_strings]
        parts = []
        for arg in extras:
            close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.6)
            parts.append(f"{arg} (did you mean {close[0]}?)" if close and arg.startswith("-")
                         else arg)
        return f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(parts)}"

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` and where to find the flags, exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n"
                     f"Run '{self.prog} --help' for its flags.\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by tests that check manifests name real flags)."""
    parser = Parser(
        prog="kvroute",
        description="KV-cache-aware request router for LLM serving fleets. Client commands "
                    "(nodes, route, complete, stats, health) read every flag also from a "
                    "KVROUTE_* variable (--router -> KVROUTE_ROUTER); serve roles read their "
                    "settings the same way.",
    )
    parser.add_argument("--version", action="version", version=f"kvroute {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the process exit code."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader closed the pipe (e.g. `| head`): stop quietly, and point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
    except ConfigError as exc:  # a KVROUTE_* variable a client flag cannot read
        print(f"kvroute: configuration error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"kvroute {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
