"""``kvroute route``: ask a router for one decision and print it."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from kvroute.grpcutil import open_channel
from kvroute.v1 import router_pb2, router_pb2_grpc


def add_parser(sub: Any) -> None:
    """Register the command's parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "route", help="ask a router for one routing decision",
        description="Send one Route request and print the decision with its reason.")
    p.add_argument("--router", required=True, metavar="HOST:PORT", help="router gRPC address")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", metavar="1,2,3", help="prompt token ids, comma separated")
    src.add_argument("--tokens-file", metavar="F",
                     help="file of token ids (whitespace/comma separated, or a JSON list)")
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (router's tokenizer)")
    p.add_argument("--session", metavar="S", help="session id for session affinity")
    p.add_argument("--policy", metavar="P", help="policy for this request (default: router's)")
    p.add_argument("--model", default="", help="model name (default: router's default)")
    p.add_argument("--request-id", default="", help="request id (default: a random one)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(run=run)


def _parse_tokens(text: str, what: str) -> list[int]:
    text = text.strip()
    try:
        if text.startswith("["):
            vals = json.loads(text)
            return [int(v) for v in vals]
        return [int(t) for t in text.replace(",", " ").split()]
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"kvroute route: {what}: expected integers ({exc})") from exc


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    req = router_pb2.RouteRequest(request_id=args.request_id or f"cli-{uuid.uuid4().hex[:12]}",
                                  model=args.model)
    if args.tokens is not None:
        req.token_ids.extend(_parse_tokens(args.tokens, "--tokens"))
    elif args.tokens_file is not None:
        try:
            text = Path(args.tokens_file).read_text()
        except OSError as exc:
            print(f"kvroute route: --tokens-file: {exc}", file=sys.stderr)
            return 2
        req.token_ids.extend(_parse_tokens(text, "--tokens-file"))
    else:
        req.prompt = args.prompt
    if args.session:
        req.session_id = args.session
    if args.policy:
        req.policy = args.policy
    try:
        if any(t < 0 or t > 2**32 - 1 for t in req.token_ids):
            raise ValueError
    except ValueError:
        print("kvroute route: token ids must be in 0..2**32-1", file=sys.stderr)
        return 2
    import asyncio

    return asyncio.run(_call(args, req))


async def _call(args: argparse.Namespace, req: router_pb2.RouteRequest) -> int:
    channel = open_channel(args.router)
    try:
        stub = router_pb2_grpc.RouterStub(channel)
        resp = await stub.Route(req, timeout=args.timeout)
    except grpc.aio.AioRpcError as exc:
        print(f"kvroute route: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        await channel.close(None)
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2))
        return 0
    print(f"node:     {resp.node_id} ({resp.address})")
    print(f"policy:   {resp.policy}{'  [DEGRADED]' if resp.degraded else ''}")
    print(f"cached:   {resp.matched_blocks} blocks = {resp.expected_cached_tokens} of "
          f"{resp.prompt_tokens} prompt tokens (block size {resp.block_size})")
    print(f"reason:   {resp.reason}")
    for c in resp.candidates:
        extra = f"  excluded: {c.excluded}" if c.excluded else ""
        print(f"  {c.node_id:<20} score {c.score:10.4f}  matched {c.matched_blocks:5d}  "
              f"load {c.load:4d}{extra}")
    return 0
