"""``kvroute complete --router HOST:PORT --request-id ID``: release a routed request."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import grpc

from cli import client_args
from cli.client_errors import ROUTER, explain
from kvroute.grpcutil import open_channel
from kvroute.settings import TLSSettings
from kvroute.v1 import router_pb2, router_pb2_grpc


def add_parser(sub: Any) -> None:
    """Register the command's parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "complete", help="release a routed request's in-flight load",
        description="Tell the router a request it routed has finished (Router.Complete), so "
                    "its node's in-flight count drops; optionally report how many prompt "
                    "tokens the engine served from its cache (the engine-reported hit rate).")
    client_args.add_target(p, "--router", "router")
    p.add_argument("--request-id", required=True, help="id of the routed request")
    p.add_argument("--cached-tokens", type=int, default=None, metavar="N",
                   help="prompt tokens the engine served from its KV cache")
    p.add_argument("--failed", action="store_true", help="the request failed on the engine")
    p.add_argument("--prefill-only", action="store_true",
                   help="disaggregated pairs: only the prefill half is done (the prefill engine "
                        "answered, its KV is handed over); the decode half stays in flight")
    client_args.add_connection(p)
    client_args.env_defaults(p)
    p.set_defaults(run=run)


async def _complete(args: argparse.Namespace, tls: TLSSettings) -> router_pb2.CompleteResponse:
    req = router_pb2.CompleteRequest(request_id=args.request_id, success=not args.failed,
                                     prefill_only=args.prefill_only)
    if args.cached_tokens is not None:
        req.cached_tokens = args.cached_tokens
    async with open_channel(args.router, tls) as ch:
        resp: router_pb2.CompleteResponse = await router_pb2_grpc.RouterStub(ch).Complete(
            req, timeout=args.timeout)
        return resp


def run(args: argparse.Namespace) -> int:
    """Run the command: exit 0 when released, 1 when the router did not know the id."""
    client_args.target(args.router, "--router")
    tls = client_args.tls(args)
    if args.cached_tokens is not None and not 0 <= args.cached_tokens <= 2**32 - 1:
        print("kvroute complete: --cached-tokens must be in 0..2**32-1", file=sys.stderr)
        return 2
    try:
        resp = asyncio.run(_complete(args, tls))
    except grpc.aio.AioRpcError as exc:
        msg = asyncio.run(explain(exc, args.router, "--router", ROUTER, tls, args.timeout))
        print(f"kvroute complete: {msg}", file=sys.stderr)
        return 1
    if resp.released:
        print(f"released: {args.request_id}")
        return 0
    print(f"kvroute complete: {args.request_id} was not in flight on {args.router} (already "
          "completed, expired by --inflight-timeout-s, or routed by another router replica)",
          file=sys.stderr)
    return 1
