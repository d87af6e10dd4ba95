"""``kvroute serve registry``."""

from __future__ import annotations

import argparse
from typing import Any

from cli.main_helpers import not_implemented


def add_parser(roles: Any, name: str) -> None:
    """Register the role's parser."""
    p: argparse.ArgumentParser = roles.add_parser(name, help="run the registry")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM."""
    return not_implemented("serve registry")
