"""``kvroute health --server HOST:PORT``: grpc.health.v1 Check, for probes and people.

Exit 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, unknown service, unreachable,
TLS refused), 2 on bad flags. TLS-aware: inside a TLS pod the ``KVROUTE_TLS_*`` variables the
server already has make the probe present the pod's certificate and verify the server with the
pod's CA (give ``--tls-server-name`` when connecting to 127.0.0.1). A router that is NOT_SERVING
is asked why (its registry link, the nodes it knows).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli import client_args
from cli.client_errors import ROUTER, list_services, router_not_routing, router_stats
from kvroute.grpcutil import open_channel
from kvroute.settings import TLSSettings


def add_parser(sub: Any) -> None:
    """Register the command's parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "health", help="check a kvroute server's gRPC health (probes, operators)",
        description="Ask a registry, router or agent for its grpc.health.v1 status. Exit 0 "
                    "when SERVING, 1 otherwise. Routers are NOT_SERVING until they have known "
                    "a node; their 'liveness' service is SERVING while the process serves.")
    client_args.add_target(p, "--server", "server")
    p.add_argument("--service", default="", metavar="NAME",
                   help="health service to check: '' (the server), a full service name such "
                        "as kvroute.v1.Router, or 'liveness' (routers)")
    p.add_argument("--quiet", action="store_true", help="print nothing when SERVING")
    client_args.add_connection(p, timeout_s=3.0)
    client_args.env_defaults(p)
    p.set_defaults(run=run)


async def _check(args: argparse.Namespace, tls: TLSSettings) -> str:
    """The status name, or a sentence saying why there is none."""
    async with open_channel(args.server, tls) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return f"UNKNOWN service {args.service!r} (the server does not report it)"
            hint = ("" if tls.enabled else
                    "; if the server uses TLS give --tls-ca-file (and --tls-cert-file/"
                    "--tls-key-file for mTLS)")
            return f"health check failed: {exc.code().name}: {exc.details()}{hint}"
        status = str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return status
        if ROUTER in await list_services(args.server, tls, args.timeout):
            st = await router_stats(ch, args.timeout)
            why = router_not_routing(st) if st is not None else ""
            return f"{status}{f' ({why})' if why else ''}"
        return status


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    client_args.target(args.server, "--server")
    tls = client_args.tls(args)
    status = asyncio.run(_check(args, tls))
    what = f"{args.server}{f' service {args.service}' if args.service else ''}"
    if status == "SERVING":
        if not args.quiet:
            print(f"{what}: SERVING")
        return 0
    print(f"{what}: {status}", file=sys.stderr)
    return 1
