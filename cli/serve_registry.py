"""``kvroute serve registry``: the placement registry (flags from RegistrySettings)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from kvroute.errors import KvrouteError
from kvroute.settings import add_arguments, from_namespace
from kvroute.telemetry import configure_logging
from registry_service.server import serve
from registry_service.settings import RegistrySettings


def add_parser(roles: Any, name: str) -> None:
    """Register the role's parser."""
    p: argparse.ArgumentParser = roles.add_parser(
        name, help="run the registry (block index, placement in etcd)",
        description="Run a registry replica: in-memory block index, node leases and placement "
                    "in etcd. Several replicas may share one etcd prefix.")
    add_arguments(p, RegistrySettings)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM; exit 0 after draining."""
    settings = from_namespace(RegistrySettings, args)
    configure_logging(settings.log_format, settings.log_level)
    try:
        return asyncio.run(serve(settings))
    except KvrouteError as exc:
        print(f"kvroute serve registry: cannot start: {exc}", file=sys.stderr)
        return 1
