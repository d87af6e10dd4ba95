"""``kvroute serve epp``."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from cli.routing_flags import add_policy_arguments, policy_settings
from kvroute.settings import add_arguments, from_namespace
from kvroute.telemetry import configure_logging
from router_service.epp.server import serve
from router_service.epp.settings import EppSettings


def add_parser(roles: Any, name: str) -> None:
    """Register the role's parser."""
    p: argparse.ArgumentParser = roles.add_parser(
        name, help="run the Envoy ext_proc endpoint picker (Gateway API Inference Extension)",
        description="Run the endpoint picker: an envoy.service.ext_proc.v3.ExternalProcessor "
                    "that reads each OpenAI request through Envoy, decides in-process with the "
                    "routing core (same flags as `kvroute serve router`) and answers with the "
                    "x-gateway-destination-endpoint header and envoy.lb metadata, as the "
                    "Gateway API Inference Extension's endpoint picker protocol says. Envoy "
                    "config: deploy/envoy/epp-bootstrap.yaml.")
    add_arguments(p, EppSettings)
    add_policy_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM."""
    settings = from_namespace(EppSettings, args)
    policies = policy_settings(args)
    configure_logging(settings.log_format, settings.log_level)
    return asyncio.run(serve(settings, policies))
