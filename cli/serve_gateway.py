"""``kvroute serve gateway``."""

from __future__ import annotations

import argparse
from typing import Any

from cli.routing_flags import add_policy_arguments, policy_settings
from kvroute.settings import add_arguments, from_namespace
from kvroute.telemetry import configure_logging
from router_service.gateway.server import run as run_gateway
from router_service.gateway.settings import GatewaySettings


def add_parser(roles: Any, name: str) -> None:
    """Register the role's parser."""
    p: argparse.ArgumentParser = roles.add_parser(
        name, help="run the OpenAI-compatible gateway (routes in-process, forwards to engines)",
        description="Run the OpenAI-compatible HTTP gateway: POST /v1/completions and "
                    "/v1/chat/completions (streaming and not), GET /v1/models, /health, /live, "
                    "/metrics. Each request is tokenized as the engine will, routed in-process "
                    "by the routing core (its own replica of the registry's index) and "
                    "forwarded to the chosen engine.")
    add_arguments(p, GatewaySettings)
    add_policy_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM."""
    settings = from_namespace(GatewaySettings, args)
    policies = policy_settings(args)
    configure_logging(settings.log_format, settings.log_level)
    return run_gateway(settings, policies)
