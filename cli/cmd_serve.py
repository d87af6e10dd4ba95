"""``kvroute serve registry|router|epp|agent|engine-sim``: run one component."""

from __future__ import annotations

import argparse
from typing import Any

from cli import serve_agent, serve_engine_sim, serve_epp, serve_registry, serve_router

ROLES = {
    "registry": serve_registry,
    "router": serve_router,
    "epp": serve_epp,
    "agent": serve_agent,
    "engine-sim": serve_engine_sim,
}


def add_parser(sub: Any) -> None:
    """Register ``serve`` and its roles."""
    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="run a kvroute component (registry, router, epp, agent, engine-sim)",
        description="Run one kvroute component. Every flag can also be given as a KVROUTE_* "
                    "environment variable. SIGTERM drains and exits 0.")
    roles = p.add_subparsers(dest="role", metavar="ROLE", required=True)
    for name, mod in ROLES.items():
        mod.add_parser(roles, name)
