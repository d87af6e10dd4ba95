"""``kvroute nodes``."""

from __future__ import annotations

import argparse
from typing import Any

from cli.main_helpers import not_implemented


def add_parser(sub: Any) -> None:
    """Register the command's parser."""
    p: argparse.ArgumentParser = sub.add_parser("nodes", help="nodes")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    return not_implemented("nodes")
