"""Entry point of the ``kvroute`` command. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from kvroute import __version__
from kvroute.errors import ConfigError

COMMANDS = {
    "serve": "cli.cmd_serve",
    "nodes": "cli.cmd_nodes",
    "route": "cli.cmd_route",
    "complete": "cli.cmd_complete",
    "stats": "cli.cmd_stats",
    "health": "cli.cmd_health",
    "demo": "cli.cmd_demo",
    "bench": "cli.cmd_bench",
}
"""Subcommand -> its module (imported only when needed: a `kvroute health` probe does not load
the servers, the bench or numpy)."""

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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full argument parser (also used by tests that check manifests name real flags), or,
    with ``only``, one holding just that subcommand (what ``main`` runs)."""
    parser = Parser(
        prog="kvroute",
        description="KV-cache-aware request router for LLM serving fleets. Client commands "
                    "(nodes, route, complete, stats, health) read every flag also from a "
                    "KVROUTE_* variable (--router -> KVROUTE_ROUTER); serve roles read their "
                    "settings the same way.",
    )
    parser.add_argument("--version", action="version", version=f"kvroute {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).add_parser(sub)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not a flag)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


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
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(_command(argv))
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
