"""``kvroute nodes --registry HOST:PORT [--json]``: the fleet as the registry sees it."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from cli import client_args
from cli.client_errors import REGISTRY, explain
from kvroute.grpcutil import open_channel
from kvroute.settings import TLSSettings
from kvroute.v1 import registry_pb2, registry_pb2_grpc


def add_parser(sub: Any) -> None:
    """Register the command's parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "nodes", help="list the nodes a registry knows",
        description="Print every node the registry knows: address, blocks indexed (GPU, and "
                    "offloaded to CPU/disk), KV usage, queue depth, health, seconds left on "
                    "its lease and how complete its index is.")
    client_args.add_target(p, "--registry", "registry")
    p.add_argument("--model", default="", help="only nodes serving this model")
    p.add_argument("--json", action="store_true", help="print the ListNodes reply as JSON")
    client_args.add_connection(p)
    client_args.env_defaults(p)
    p.set_defaults(run=run)


async def _list(args: argparse.Namespace, tls: TLSSettings) -> registry_pb2.ListNodesResponse:
    async with open_channel(args.registry, tls) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)
        resp: registry_pb2.ListNodesResponse = await stub.ListNodes(
            registry_pb2.ListNodesRequest(model=args.model), timeout=args.timeout)
        return resp


def format_table(resp: registry_pb2.ListNodesResponse) -> str:
    """The human-readable table."""
    head = ("NODE", "ADDRESS", "MODEL", "BLOCKS", "OFFLOADED", "USAGE", "QUEUE", "RUNNING",
            "HEALTHY", "LEASE_LEFT", "INDEX")
    rows = [head] + [
        (n.node_id, n.address, n.model, str(n.blocks_indexed), str(n.offloaded_blocks_indexed),
         f"{n.usage * 100:.0f}%",
         str(n.queue_depth), str(n.running), "yes" if n.healthy else "NO",
         f"{n.lease_remaining_s:.1f}s", _index(n)) for n in resp.nodes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.append(f"{len(resp.nodes)} node(s); block size {resp.block_size}; "
                 f"replica {resp.replica_id}")
    lines += [f"  {n.node_id}: index {_index(n)}: {n.index_note}" for n in resp.nodes
              if n.index_note]
    return "\n".join(lines)


def _index(n: registry_pb2.NodeInfo) -> str:
    """complete / partial / no_events ('-' from agents that do not report it)."""
    if not n.index_state:
        return "-"
    return registry_pb2.IndexState.Name(n.index_state).removeprefix("INDEX_STATE_").lower()


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    client_args.target(args.registry, "--registry")
    tls = client_args.tls(args)
    try:
        resp = asyncio.run(_list(args, tls))
    except grpc.aio.AioRpcError as exc:
        msg = asyncio.run(explain(exc, args.registry, "--registry", REGISTRY, tls,
                                  args.timeout))
        print(f"kvroute nodes: {msg}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2))
    else:
        print(format_table(resp))
    return 0
