"""Small helpers shared by the subcommand modules."""

from __future__ import annotations

import sys


def not_implemented(what: str) -> int:
    """Report an unfinished command honestly and fail (exit 3)."""
    print(f"kvroute {what}: not implemented yet", file=sys.stderr)
    return 3
