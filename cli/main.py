"""Entry point of the ``kvroute`` command. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import cmd_bench, cmd_demo, cmd_nodes, cmd_route, cmd_serve
from kvroute import __version__
from kvroute.errors import ConfigError

COMMANDS = (cmd_serve, cmd_nodes, cmd_route, cmd_demo, cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by tests that check manifests name real flags)."""
    parser = argparse.ArgumentParser(
        prog="kvroute",
        description="KV-cache-aware request router for LLM serving fleets.",
    )
    parser.add_argument("--version", action="version", version=f"kvroute {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"kvroute: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
