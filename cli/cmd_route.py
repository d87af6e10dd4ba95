"""``kvroute route``: ask a router for one decision, print it, then release it.

The router counts a routed request as in flight on its node until ``Complete`` (or until
``--inflight-timeout-s``); a probe that only looks at a decision would otherwise leave load
behind on every call. So ``route`` completes what it routed, unless ``--keep-inflight`` says the
caller will send the request to the node and run ``kvroute complete`` itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from cli import client_args
from cli.client_errors import ROUTER, explain, router_not_routing, router_stats
from kvroute.grpcutil import open_channel
from kvroute.settings import TLSSettings
from kvroute.v1 import router_pb2, router_pb2_grpc


def add_parser(sub: Any) -> None:
    """Register the command's parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "route", help="ask a router for one routing decision",
        description="Send one Route request, print the decision with its reason, then release "
                    "it with Complete (so the probe leaves no in-flight load behind), unless "
                    "--keep-inflight.")
    client_args.add_target(p, "--router", "router")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", metavar="1,2,3", help="prompt token ids, comma separated")
    src.add_argument("--tokens-file", metavar="F",
                     help="file of token ids (whitespace/comma separated, or a JSON list)")
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (router's tokenizer)")
    p.add_argument("--session", metavar="S", help="session id for session affinity")
    p.add_argument("--policy", metavar="P", help="policy for this request (default: router's)")
    p.add_argument("--model", default="", help="model name (default: router's default)")
    p.add_argument("--request-id", default="", help="request id (default: a random one)")
    p.add_argument("--keep-inflight", action="store_true",
                   help="do not release the decision: the request stays in flight on its node "
                        "until `kvroute complete --request-id ID` or the router's "
                        "--inflight-timeout-s")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    client_args.add_connection(p)
    client_args.env_defaults(p)
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
    client_args.target(args.router, "--router")
    tls = client_args.tls(args)
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
    return asyncio.run(_call(args, req, tls))


async def _call(args: argparse.Namespace, req: router_pb2.RouteRequest,
                tls: TLSSettings) -> int:
    async with open_channel(args.router, tls) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        try:
            resp = await stub.Route(req, timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            msg = ""
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                # The router answered (Stats works): the decision itself was refused.
                st = await router_stats(channel, args.timeout)
                if st is not None:
                    why = router_not_routing(st)
                    msg = f"UNAVAILABLE: {exc.details()}" + (f"\n  {why[0].upper()}{why[1:]}."
                                                             if why else "")
            if not msg:
                msg = await explain(exc, args.router, "--router", ROUTER, tls, args.timeout)
            print(f"kvroute route: {msg}", file=sys.stderr)
            return 1
        released: bool | None = None
        if not args.keep_inflight:
            try:
                done = await stub.Complete(router_pb2.CompleteRequest(
                    request_id=resp.request_id, success=True), timeout=args.timeout)
                released = done.released
            except grpc.aio.AioRpcError as exc:
                print(f"kvroute route: warning: could not release {resp.request_id} "
                      f"({exc.code().name}: {exc.details()}); it stays in flight until the "
                      "router's --inflight-timeout-s", file=sys.stderr)
    if args.json:
        out = MessageToDict(resp, preserving_proto_field_name=True,
                            always_print_fields_with_no_presence=True)
        out["released"] = released
        print(json.dumps(out, indent=2))
        return 0
    print(f"node:     {resp.node_id} ({resp.address})")
    print(f"policy:   {resp.policy}{'  [DEGRADED]' if resp.degraded else ''}")
    print(f"cached:   {resp.matched_blocks} blocks = {resp.expected_cached_tokens} of "
          f"{resp.prompt_tokens} prompt tokens (block size {resp.block_size})")
    if resp.offloaded_blocks:
        print(f"offloaded: {resp.offloaded_blocks} more blocks = "
              f"{resp.expected_offloaded_tokens} tokens on the node's CPU/disk tier (loaded "
              "back, not counted as cached)")
    print(f"reason:   {resp.reason}")
    for c in resp.candidates:
        extra = f"  excluded: {c.excluded}" if c.excluded else ""
        off = f"+{c.offloaded_blocks} offloaded  " if c.offloaded_blocks else ""
        print(f"  {c.node_id:<20} score {c.score:10.4f}  matched {c.matched_blocks:5d}  "
              f"{off}load {c.load:4d}{extra}")
    if released is None:
        print(f"in flight: {resp.request_id} (release it with: kvroute complete --router "
              f"{args.router} --request-id {resp.request_id})")
    else:
        print(f"released: {resp.request_id} (route completes what it routed; "
              "--keep-inflight keeps it)")
    return 0
