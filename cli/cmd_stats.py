"""``kvroute stats --router HOST:PORT [--json]``: a router's counters and registry link."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from cli import client_args
from cli.client_errors import ROUTER, explain
from kvroute.grpcutil import open_channel
from kvroute.settings import TLSSettings
from kvroute.v1 import router_pb2, router_pb2_grpc


def add_parser(sub: Any) -> None:
    """Register the command's parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "stats", help="show a router's decisions, in-flight load and registry link",
        description="Print Router.Stats: the registry link (connected, staleness, nodes "
                    "known), decisions by policy, degraded decisions, in-flight requests by "
                    "node, and predicted vs engine-reported cached tokens.")
    client_args.add_target(p, "--router", "router")
    p.add_argument("--json", action="store_true", help="print the Stats reply as JSON")
    client_args.add_connection(p)
    client_args.env_defaults(p)
    p.set_defaults(run=run)


async def _stats(args: argparse.Namespace, tls: TLSSettings) -> router_pb2.StatsResponse:
    async with open_channel(args.router, tls) as ch:
        resp: router_pb2.StatsResponse = await router_pb2_grpc.RouterStub(ch).Stats(
            router_pb2.StatsRequest(), timeout=args.timeout)
        return resp


def format_stats(st: router_pb2.StatsResponse) -> str:
    """The human-readable report."""
    link = ("connected" if st.registry_connected
            else f"DOWN (no registry data for {st.registry_staleness_s:.1f} s)")
    lines = [f"registry:   {link}; {st.nodes_known} node(s) known",
             f"policies:   {', '.join(st.policies)} (default {st.default_policy})"]
    total = sum(st.decisions_by_policy.values())
    by = ", ".join(f"{k} {v}" for k, v in sorted(st.decisions_by_policy.items())) or "none"
    lines.append(f"decisions:  {total} ({by}); degraded {st.degraded_decisions}")
    inflight = sum(st.inflight_by_node.values())
    nodes = ", ".join(f"{k} {v}" for k, v in sorted(st.inflight_by_node.items()) if v)
    lines.append(f"in flight:  {inflight}{f' ({nodes})' if nodes else ''}; released by "
                 f"timeout {st.inflight_expired}")
    lines.append(f"cached tokens: predicted {st.predicted_cached_tokens}, reported by engines "
                 f"{st.reported_cached_tokens}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    client_args.target(args.router, "--router")
    tls = client_args.tls(args)
    try:
        st = asyncio.run(_stats(args, tls))
    except grpc.aio.AioRpcError as exc:
        msg = asyncio.run(explain(exc, args.router, "--router", ROUTER, tls, args.timeout))
        print(f"kvroute stats: {msg}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(st, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2))
    else:
        print(format_stats(st))
    return 0
