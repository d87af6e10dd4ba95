"""``kvroute bench router``: Route latency and decisions/s over gRPC with the registry in the path.

Starts real processes on loopback — etcd (or the registry's memory store), ``kvroute serve
registry`` and ``kvroute serve router`` (once per registry mode: ``mirror`` and ``stream``) —
registers nodes holding known blocks through the Registry gRPC API, then drives the router from
client processes:

- an empty gRPC call (``grpc.health.v1.Health/Check`` on the router) as the unary baseline, and
  empty RouteStream messages (no request id: answered at once with an error reply) as the
  stream baseline,
- unary ``Route`` with 1 caller (latency; added latency = Route p50 - empty p50) and with many
  concurrent callers (decisions/s),
- unary ``Route`` open-loop at a fixed rate (p99 at 500/s),
- ``RouteStream`` with several streams and a window of outstanding requests (decisions/s).

Numbers are side-by-side ratios from one run on a shared machine; clients share the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.router_load import measure
from kvroute.blocks import hash_blocks
from kvroute.embedded_etcd import EmbeddedEtcd
from kvroute.errors import ConfigError
from kvroute.procs import ManagedProcess, read_ready_file
from kvroute.settings import add_value_arguments, setting, value_arguments
from kvroute.v1 import registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc

TARGETS = {"unary_decisions_per_s": 3000.0, "stream_decisions_per_s": 10000.0,
           "p99_at_rate_ms": 5.0, "added_latency_p50_ms": 0.5}


@dataclass
class RouterBenchConfig:
    """Knobs of the router benchmark (those made with ``setting`` are the ``--router-*`` flags
    of ``kvroute bench router``)."""

    nodes: int = setting(8, "registered nodes")
    duration_s: float = setting(3.0, "seconds per measured load shape")
    unary_concurrency: int = setting(32, "concurrent unary callers per client process",
                                     flag="--router-concurrency")
    streams: int = setting(4, "RouteStream streams per client process")
    stream_window: int = setting(64, "outstanding requests per stream", flag="--router-window")
    rate_per_s: float = setting(500.0, "open-loop unary rate for the p99 measurement "
                                       "(requests/s)", flag="--router-rate")
    client_procs: int = setting(1, "client processes for the throughput shapes")
    modes: tuple[str, ...] = setting(
        ("mirror", "stream"), "registry modes to measure: mirror,stream; MODE+share runs the "
                              "router with --share-routes (one router: what sharing costs)")
    registry_store: str = setting("etcd", "registry store: etcd (real etcd) or memory",
                                  flag="--router-store")
    prompt_tokens: int = setting(1024, "tokens per routed prompt")
    families: int = 64
    block_size: int = 16
    policy: str = "kv_aware"
    seed: int = 7


# -- workload ---------------------------------------------------------------------------------
def make_workload(cfg: RouterBenchConfig) -> tuple[list[list[int]], dict[str, list[int]]]:
    """(request token lists, node -> cached block hashes): families of shared prefixes."""
    rng = random.Random(cfg.seed)
    fams = [[rng.randrange(1, 50_000) for _ in range(cfg.prompt_tokens)]
            for _ in range(cfg.families)]
    placement: dict[str, list[int]] = {f"node-{i}": [] for i in range(cfg.nodes)}
    for f, toks in enumerate(fams):
        hashes = hash_blocks(toks, cfg.block_size)
        placement[f"node-{f % cfg.nodes}"].extend(hashes)
        placement[f"node-{(f + 1) % cfg.nodes}"].extend(hashes[: len(hashes) // 3])
    reqs = []
    keep = cfg.prompt_tokens * 3 // 4
    for _ in range(512):
        fam = fams[rng.randrange(cfg.families)]
        reqs.append(fam[:keep] + [rng.randrange(1, 50_000)
                                  for _ in range(cfg.prompt_tokens - keep)])
    return reqs, placement


async def register_nodes(registry: str, placement: dict[str, list[int]], block_size: int,
                         model: str = "bench") -> dict[str, tuple[int, str]]:
    """RegisterNode + one Heartbeat carrying the blocks; returns node -> (epoch, write token)."""
    async with grpc.aio.insecure_channel(registry) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)
        epochs: dict[str, tuple[int, str]] = {}
        for nid, blocks in placement.items():
            r = await stub.RegisterNode(registry_pb2.RegisterNodeRequest(
                node_id=nid, address=f"127.0.0.1:{9000 + len(epochs)}", model=model,
                block_size=block_size, capacity_blocks=max(1, len(blocks) * 2)), timeout=10)
            epochs[nid] = (r.epoch, r.write_token)
            await stub.Heartbeat(registry_pb2.HeartbeatRequest(
                node_id=nid, epoch=r.epoch, write_token=r.write_token, used_blocks=len(blocks),
                stored=blocks, delta_seq=1), timeout=10)
        return epochs


async def keep_alive(registry: str, epochs: dict[str, tuple[int, str]],
                     interval_s: float) -> None:
    """Heartbeat every node until cancelled (keeps leases alive during the run)."""
    async with grpc.aio.insecure_channel(registry) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)
        while True:
            await asyncio.sleep(interval_s)
            for nid, (ep, token) in epochs.items():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Heartbeat(registry_pb2.HeartbeatRequest(
                        node_id=nid, epoch=ep, write_token=token), timeout=5)


# -- orchestration ----------------------------------------------------------------------------
def _serve(role: str, args: list[str], work: Path, name: str,
           ) -> tuple[ManagedProcess, dict[str, Any]]:
    ready = work / f"{name}.ready.json"
    argv = [sys.executable, "-m", "cli.main", "serve", role, "--ready-file", str(ready),
            "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *args]
    proc = ManagedProcess(name, argv, work / f"{name}.log").start()
    try:
        return proc, read_ready_file(ready, 30, proc)
    except BaseException:
        proc.stop()
        raise


def _wait_routable(target: str, tokens: list[int], timeout_s: float = 20.0) -> None:
    async def check() -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(target) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            while True:
                try:
                    r = await stub.Route(router_pb2.RouteRequest(
                        request_id="warmup", token_ids=tokens), timeout=2)
                    if not r.degraded and r.matched_blocks > 0:
                        await stub.Complete(router_pb2.CompleteRequest(request_id="warmup"))
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("router never routed on registry data")
                await asyncio.sleep(0.1)

    asyncio.run(check())


def run_router_bench(cfg: RouterBenchConfig, log: Callable[[str], None] = print,
                     ) -> dict[str, Any]:
    """Run the whole benchmark; returns the JSON-ready result."""
    tokens, placement = make_workload(cfg)
    out: dict[str, Any] = {"config": asdict(cfg), "targets": TARGETS, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="kvroute-router-bench-") as tmp:
        work = Path(tmp)
        etcd = None
        procs: list[ManagedProcess] = []
        try:
            reg_args = ["--block-size", str(cfg.block_size), "--store", cfg.registry_store]
            if cfg.registry_store == "etcd":
                etcd = EmbeddedEtcd(work / "etcd").start()
                reg_args += ["--etcd-endpoints", etcd.endpoint]
            reg, reg_ready = _serve("registry", reg_args, work, "registry")
            procs.append(reg)
            registry = f"127.0.0.1:{reg_ready['grpc_port']}"
            epochs = asyncio.run(register_nodes(registry, placement, cfg.block_size))
            log(f"registry {registry}: {cfg.nodes} nodes, "
                f"{sum(len(v) for v in placement.values())} blocks")
            hb = ManagedProcess("heartbeats", [sys.executable, "-c",
                                               _HB_SCRIPT.format(registry=registry,
                                                                 epochs=dict(epochs))],
                                work / "hb.log").start()
            procs.append(hb)
            for mode in cfg.modes:
                reg_mode, _, extra = mode.partition("+")
                rt, rt_ready = _serve("router", [
                    "--registry", registry, "--registry-mode", reg_mode,
                    "--block-size", str(cfg.block_size), "--default-policy", cfg.policy,
                    "--inflight-timeout-s", "5", "--log-level", "warning",
                    *(["--share-routes"] if extra == "share" else [])], work,
                    f"router-{reg_mode}{'-share' if extra else ''}")
                target = f"127.0.0.1:{rt_ready['grpc_port']}"
                try:
                    _wait_routable(target, tokens[0])
                    res = _measure_mode(target, cfg, tokens, mode, log, rt.pid)
                    res["router_decision_mean_us"] = _decision_mean_us(
                        f"http://127.0.0.1:{rt_ready['metrics_port']}/metrics")
                    log(f"[{mode}] mean decision time inside the router: "
                        f"{res['router_decision_mean_us']} us")
                    out["modes"][mode] = res
                finally:
                    rt.stop()
        finally:
            for p in reversed(procs):
                p.stop()
            if etcd is not None:
                etcd.stop()
    out["verdict"] = _verdict(out["modes"])
    return out


def _decision_mean_us(url: str) -> float:
    """Mean of kvroute_router_route_latency_seconds (validation, hashing, lookup, policy)."""
    with urllib.request.urlopen(url, timeout=5) as f:
        text = f.read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("_sum", "_count"):
            name = f"kvroute_router_route_latency_seconds{key} "
            if line.startswith(name):
                vals[key] = float(line.split()[1])
    if not vals.get("_count"):
        return float("nan")
    return round(vals["_sum"] / vals["_count"] * 1e6, 1)


def _cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _measure_mode(target: str, cfg: RouterBenchConfig, tokens: list[list[int]], mode: str,
                  log: Callable[[str], None], router_pid: int) -> dict[str, Any]:
    d, cp = cfg.duration_s, cfg.client_procs
    res: dict[str, Any] = {}
    shapes: list[tuple[str, str, dict[str, Any], int]] = [
        ("empty_c1", "empty", {"concurrency": 1, "duration_s": d}, 1),
        ("route_c1", "route", {"concurrency": 1, "duration_s": d}, 1),
        ("empty_cN", "empty", {"concurrency": cfg.unary_concurrency, "duration_s": d}, cp),
        ("route_cN", "route", {"concurrency": cfg.unary_concurrency, "duration_s": d}, cp),
        ("route_at_rate", "route_rate", {"rate": cfg.rate_per_s, "duration_s": d}, 1),
        ("stream_empty", "stream_empty", {"streams": cfg.streams, "window": cfg.stream_window,
                                          "duration_s": d}, cp),
        ("route_stream", "stream", {"streams": cfg.streams, "window": cfg.stream_window,
                                    "duration_s": d}, cp),
    ]
    for name, kind, params, procs in shapes:
        cpu0 = _cpu_s(router_pid)
        res[name] = measure(target, kind, params, tokens, procs, f"{mode}-{name}")
        used = _cpu_s(router_pid) - cpu0
        if res[name]["count"]:
            res[name]["router_cpu_us_per_call"] = round(used / res[name]["count"] * 1e6, 1)
        log(f"[{mode}] {name:14s} {res[name]}")
    res["added_latency_p50_ms"] = round(res["route_c1"]["p50_ms"] - res["empty_c1"]["p50_ms"], 3)
    return res


def _verdict(modes: dict[str, Any]) -> dict[str, Any]:
    v: dict[str, Any] = {}
    for mode, r in modes.items():
        v[mode] = {
            "unary_decisions_per_s": r["route_cN"]["per_s"],
            "unary_met": r["route_cN"]["per_s"] >= TARGETS["unary_decisions_per_s"],
            "stream_decisions_per_s": r["route_stream"]["per_s"],
            "stream_met": r["route_stream"]["per_s"] >= TARGETS["stream_decisions_per_s"],
            "p99_at_rate_ms": r["route_at_rate"]["p99_ms"],
            "p99_met": r["route_at_rate"]["p99_ms"] <= TARGETS["p99_at_rate_ms"],
            "added_latency_p50_ms": r["added_latency_p50_ms"],
            "added_met": r["added_latency_p50_ms"] <= TARGETS["added_latency_p50_ms"],
            "empty_unary_per_s": r["empty_cN"]["per_s"],
            "empty_stream_msgs_per_s": r["stream_empty"]["per_s"],
        }
    return v


_HB_SCRIPT = """
import asyncio
from bench.router_bench import keep_alive
asyncio.run(keep_alive({registry!r}, {epochs!r}, 2.0))
"""


# -- CLI (``kvroute bench router``) -----------------------------------------------------------
def add_router_arguments(p: Any) -> None:
    """Flags of ``kvroute bench router`` (all prefixed ``--router-``)."""
    add_value_arguments(p.add_argument_group("router (kvroute bench router)"),
                        RouterBenchConfig, prefix="router-")


def _modes(value: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in value.split(",") if m.strip())
    for m in modes:
        base, _, extra = m.partition("+")
        if base not in ("mirror", "replica", "stream") or extra not in ("", "share"):
            raise ConfigError(f"--router-modes: {m!r} is not mirror or stream, optionally "
                             f"with +share")
    return modes


def run_router_cli(args: Any) -> int:
    """``kvroute bench router``: print progress and the verdict, write JSON if asked."""
    import json

    given = value_arguments(RouterBenchConfig, args, prefix="router-")
    cfg = RouterBenchConfig(**{**given, "modes": _modes(given["modes"])},
                            block_size=args.block_size)
    res = run_router_bench(cfg)
    print(json.dumps(res["verdict"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0
