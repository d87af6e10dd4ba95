"""``kvroute bench share``: staleness of the shared view through a real registry (issue 19).

An in-process registry (memory store, real gRPC on loopback) with ``--nodes`` registered nodes
and ``--routers`` routing runtimes with ``--share-routes``; requests are routed round robin over
the replicas at ``--rate`` per second and completed ``--hold-s`` later. Every delta a replica
applies is timed from the sender's decision to the receiver's apply (one machine, one clock):
that is the staleness ``kvroute bench --mode sim --share-delay-s`` models.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from kvroute.blocks import HASH_SCHEME
from kvroute.procs import free_port
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from registry_service.server import serve
from registry_service.settings import RegistrySettings
from router_service.domain import RouteRequest
from router_service.runtime import RoutingRuntime
from router_service.settings import RouterSettings


def add_share_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``kvroute bench share``."""
    p.add_argument("--routers", type=int, default=4, help="router replicas (default 4)")
    p.add_argument("--nodes", type=int, default=8, help="registered nodes (default 8)")
    p.add_argument("--requests", type=int, default=2000, help="requests routed (default 2000)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="requests per second over all replicas (default 200)")
    p.add_argument("--hold-s", type=float, default=0.5,
                   help="seconds between a request's decision and its Complete (default 0.5)")


async def _until(cond: Any, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError("the registry or the replicas' links did not come up in time")
        await asyncio.sleep(0.02)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        stop = asyncio.Event()
        reg = asyncio.create_task(serve(RegistrySettings(
            store="memory", listen=f"127.0.0.1:{free_port()}", ready_file=str(ready),
            metrics_listen="127.0.0.1:0", status_write_interval_s=0), stop))
        await _until(ready.exists)
        target = f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}"
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.RegistryStub(ch)
            for i in range(args.nodes):
                await stub.RegisterNode(pb.RegisterNodeRequest(
                    node_id=f"n{i}", address=f"n{i}:8000", model="m", block_size=16,
                    capacity_blocks=10_000, hash_scheme=HASH_SCHEME))
        lags: list[float] = []
        rts = [RoutingRuntime(RouterSettings(registry=target, share_routes=True,
                                             router_replica_id=f"r{k}"), None,
                              CollectorRegistry()) for k in range(args.routers)]
        try:
            for rt in rts:
                await rt.start()
                assert rt.core.share is not None
                rt.core.share.on_staleness = lags.append
            await _until(lambda: all(rt.core.source.connected and rt.core.share is not None
                                     and rt.core.share.live() for rt in rts))
            pending: list[asyncio.Task[None]] = []

            async def complete_later(rt: RoutingRuntime, rid: str) -> None:
                await asyncio.sleep(args.hold_s)
                rt.core.complete(rid)

            t0 = time.perf_counter()
            for i in range(args.requests):
                due = t0 + i / args.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                rt = rts[i % len(rts)]
                tokens = list(range(i * 7, i * 7 + 256))
                await rt.core.decide(RouteRequest(f"q{i}", model="m", token_ids=tokens))
                pending.append(asyncio.create_task(complete_later(rt, f"q{i}")))
            await asyncio.gather(*pending)
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(0.5)
            left = {rt.core.share.replica_id: rt.core.share.remote.total  # type: ignore[union-attr]
                    for rt in rts}
        finally:
            for rt in rts:
                await rt.stop()
            stop.set()
            await reg
    ms = np.array(lags) * 1000.0 if lags else np.zeros(1)
    return {"routers": args.routers, "nodes": args.nodes, "requests": args.requests,
            "rate_per_s": round(args.requests / elapsed, 1),
            "deltas_applied": len(lags),
            "deltas_expected": 2 * args.requests * (args.routers - 1),
            "staleness_ms": {q: round(float(np.percentile(ms, p)), 3) for q, p in
                             (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "remote_inflight_left": left}


def run_share_cli(args: argparse.Namespace) -> int:
    """``kvroute bench share``: print and optionally write the result."""
    out = asyncio.run(_run(args))
    s = out["staleness_ms"]
    print(f"shared view over a real registry: {out['routers']} replicas, {out['nodes']} nodes, "
          f"{out['requests']} requests at {out['rate_per_s']}/s")
    print(f"  deltas applied {out['deltas_applied']} of {out['deltas_expected']}; staleness "
          f"p50 {s['p50']:.2f} ms  p90 {s['p90']:.2f} ms  p99 {s['p99']:.2f} ms  "
          f"max {s['max']:.2f} ms")
    print(f"  remote in-flight left after every Complete: {out['remote_inflight_left']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
