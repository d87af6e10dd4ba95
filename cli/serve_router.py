"""``kvroute serve router``."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from cli.routing_flags import add_policy_arguments, policy_settings
from kvroute.settings import add_arguments, from_namespace
from kvroute.telemetry import configure_logging
from router_service.policies.factory import available
from router_service.server import serve
from router_service.settings import RouterSettings


def add_parser(roles: Any, name: str) -> None:
    """Register the role's parser."""
    policies = ", ".join(f"{n} ({s.help})" for n, s in available().items())
    p: argparse.ArgumentParser = roles.add_parser(
        name, help="run the router",
        description="Run the request router: hashes prompts into canonical KV blocks, learns "
                    "placement from the registry and applies a routing policy. Policies: "
                    f"{policies}.")
    add_arguments(p, RouterSettings)
    add_policy_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM."""
    settings = from_namespace(RouterSettings, args)
    policies = policy_settings(args)
    configure_logging(settings.log_format, settings.log_level)
    return asyncio.run(serve(settings, policies))
