"""``kvroute serve agent``: the node agent beside one engine."""

from __future__ import annotations

import argparse
from typing import Any

from kvroute.settings import add_arguments, from_namespace
from node_agent.server import main
from node_agent.settings import AgentSettings


def add_parser(roles: Any, name: str) -> None:
    """Register the role's parser."""
    p: argparse.ArgumentParser = roles.add_parser(
        name, help="run the node agent (engine KV events -> registry heartbeats)",
        description="Run the node agent beside one engine: subscribe to its KV-cache events "
                    "(vLLM or SGLang ZMQ publisher), turn them into canonical block hashes and "
                    "heartbeat the registry with usage and block deltas; full resync after "
                    "reconnects, gaps and engine restarts. Exit code 4 when the registry "
                    "refuses the node (block size, hash scheme or model mismatch).")
    add_arguments(p, AgentSettings)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM."""
    return main(from_namespace(AgentSettings, args))
