"""``kvroute bench share``: staleness of the shared view through a real registry (issue 19).

An in-process registry (memory store, real gRPC on loopback) with ``--nodes`` registered nodes
and ``--routers`` routing runtimes with ``--share-routes``; requests are routed round robin over
the replicas at ``--rate`` per second and completed ``--hold-s`` later. Every delta a replica
applies is timed from the sender's decision to the receiver's apply (one machine, one clock):
that is the staleness ``kvroute bench --mode sim --share-delay-s`` models.

``--registries N`` (N > 1) runs N registry replicas on a real etcd (embedded, or
``KVROUTE_ETCD_ENDPOINTS``) and connects router k to registry k mod N: a delta between routers on
different registries goes hub -> relay -> hub, so with ``--routers N --registries N`` every
delta measured crossed the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from kvroute.blocks import HASH_SCHEME
from kvroute.embedded_etcd import EmbeddedEtcd
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
    p.add_argument("--registries", type=int, default=1,
                   help="registry replicas (default 1, memory store); more run on a real etcd "
                        "and relay to one another; router k streams to registry k mod N")


async def _until(cond: Any, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError("the registry or the replicas' links did not come up in time")
        await asyncio.sleep(0.02)


def _relay_links(metrics_port: int) -> float:
    """``kvroute_registry_route_share_relay_links`` of the registry serving /metrics there."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("kvroute_registry_route_share_relay_links "):
                return float(line.split()[1])
    return 0.0


async def _relayed(ports: list[int], within_s: float = 30.0) -> None:
    """Wait until every registry relays to every other."""
    deadline = time.monotonic() + within_s
    while True:
        links = [await asyncio.to_thread(_relay_links, p) for p in ports]
        if all(n == len(ports) - 1 for n in links):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the registries' relay links did not come up: {links}")
        await asyncio.sleep(0.1)


async def _registries(args: argparse.Namespace, tmp: Path, stop: asyncio.Event,
                      ) -> tuple[list[str], list[int], list[asyncio.Task[int]],
                                 EmbeddedEtcd | None]:
    """Start the registries (and etcd when there are several); their gRPC targets."""
    etcd: EmbeddedEtcd | None = None
    store: dict[str, Any] = {"store": "memory"}
    if args.registries > 1:
        given = os.environ.get("KVROUTE_ETCD_ENDPOINTS", "")
        if not given:
            etcd = EmbeddedEtcd(tmp / "etcd").start()
            given = etcd.endpoint
        store = {"store": "etcd", "etcd_endpoints": (given.split(",")[0],),
                 "etcd_prefix": f"/kvroute-bench-share/{uuid.uuid4().hex[:8]}/"}
    targets, ports, tasks = [], [], []
    for k in range(args.registries):
        ready = tmp / f"ready-{k}.json"
        tasks.append(asyncio.create_task(serve(RegistrySettings(
            listen="127.0.0.1:0", ready_file=str(ready), replica_id=f"reg-{k}",
            metrics_listen="127.0.0.1:0", status_write_interval_s=0,
            # the bench's nodes are registered once and never heartbeat: their leases must
            # outlive the run however slow a loaded machine makes it (10 s by default)
            lease_ttl_s=3600, **store), stop)))
        await _until(ready.exists)
        info = json.loads(ready.read_text())
        targets.append(f"127.0.0.1:{info['grpc_port']}")
        ports.append(int(info["metrics_port"]))
    return targets, ports, tasks, etcd


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        stop = asyncio.Event()
        targets, metrics_ports, regs, etcd = await _registries(args, Path(tmp), stop)
        target = targets[0]
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.RegistryStub(ch)
            for i in range(args.nodes):
                await stub.RegisterNode(pb.RegisterNodeRequest(
                    node_id=f"n{i}", address=f"n{i}:8000", model="m", block_size=16,
                    capacity_blocks=10_000, hash_scheme=HASH_SCHEME))
        lags: list[float] = []
        rts = [RoutingRuntime(RouterSettings(registry=targets[k % len(targets)],
                                             share_routes=True, router_replica_id=f"r{k}"),
                              None, CollectorRegistry()) for k in range(args.routers)]
        try:
            for rt in rts:
                await rt.start()
                assert rt.core.share is not None
                rt.core.share.on_staleness = lags.append
            await _until(lambda: all(rt.core.source.connected and rt.core.share is not None
                                     and rt.core.share.live() for rt in rts))
            if len(targets) > 1:  # every router hears every other: the relay links are up
                await _relayed(metrics_ports)
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
            await asyncio.gather(*regs)
            if etcd is not None:
                etcd.stop()
    ms = np.array(lags) * 1000.0 if lags else np.zeros(1)
    return {"routers": args.routers, "registries": args.registries, "nodes": args.nodes,
            "requests": args.requests,
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
    print(f"shared view over {out['registries']} real registr"
          f"{'y' if out['registries'] == 1 else 'ies (relayed)'}: {out['routers']} replicas, "
          f"{out['nodes']} nodes, "
          f"{out['requests']} requests at {out['rate_per_s']}/s")
    print(f"  deltas applied {out['deltas_applied']} of {out['deltas_expected']}; staleness "
          f"p50 {s['p50']:.2f} ms  p90 {s['p90']:.2f} ms  p99 {s['p99']:.2f} ms  "
          f"max {s['max']:.2f} ms")
    print(f"  remote in-flight left after every Complete: {out['remote_inflight_left']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
