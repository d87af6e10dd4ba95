"""``kvroute serve engine-sim``: a simulated vLLM-like engine (HTTP API + ZMQ KV events)."""

from __future__ import annotations

import argparse
from typing import Any

from engine_sim.server import run as run_server
from engine_sim.settings import EngineSimSettings
from kvroute.settings import add_arguments, from_namespace


def add_parser(roles: Any, name: str) -> None:
    """Register the role's parser."""
    p: argparse.ArgumentParser = roles.add_parser(
        name, help="run a simulated engine (vLLM-compatible HTTP API and KV events)",
        description="A simulated LLM engine: finite LRU KV cache with prefix reuse, a latency "
                    "model, an OpenAI-compatible HTTP API on --listen, vLLM's Prometheus "
                    "metrics, and KV cache events on ZMQ in vLLM's wire format.")
    add_arguments(p, EngineSimSettings)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM."""
    return run_server(from_namespace(EngineSimSettings, args))
