"""``kvroute bench flood``: a rogue registry client against real processes.

Starts etcd, ``kvroute serve registry`` and one ``kvroute serve router`` per registry mode
(``mirror``: local index mirror fed by WatchPlacement; ``stream``: a LookupStream call to the
registry per Route) on loopback, registers nodes holding known blocks (kept alive by a
heartbeat process), then:

1. measures each router's Route p50/p99 at a fixed rate (open loop, own client process): the
   steady value (measured again after the flood; the steady p99 is the larger of the two
   windows that bracket the flood, so a burst of other work on a shared machine in the one
   window before it does not decide the verdict);
2. registers a rogue node with ``capacity_blocks`` 1,000 and sends one Heartbeat of 1 M stored
   hashes: expects RESOURCE_EXHAUSTED naming the node, the limit and the count, and 0 blocks
   indexed for the rogue afterwards;
3. floods: a rogue process sends such heartbeats back to back over several connections
   while each router's Route p50/p99 are measured again;
4. reads registry and router RSS (``/proc/PID/status`` VmRSS) before step 2 and after step 3.

Verdict: the heartbeat refused, the index unchanged, every RSS within ``rss_slack_mb``, and
each router's flood p99 within 2x of its steady p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.router_bench import _HB_SCRIPT, _serve, _wait_routable, register_nodes
from bench.router_load import measure
from kvroute.blocks import hash_blocks
from kvroute.embedded_etcd import EmbeddedEtcd
from kvroute.procs import ManagedProcess
from kvroute.settings import add_value_arguments, setting, value_arguments
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc

ROGUE_SCRIPT = """
import asyncio, json, sys, time
import grpc
target, epoch, token, hashes, seconds, conns = sys.argv[1:7]
from kvroute.v1 import registry_pb2 as pb
msg = pb.HeartbeatRequest(node_id="rogue", epoch=int(epoch), write_token=token,
                          stored=range(1, int(hashes) + 1), delta_seq=1).SerializeToString()
codes = {}
async def one(i):
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1),
            ("kvroute.rogue", i)]
    async with grpc.aio.insecure_channel(target, options=opts) as ch:
        call = ch.unary_unary("/kvroute.v1.Registry/Heartbeat")
        end = time.monotonic() + float(seconds)
        while time.monotonic() < end:
            try:
                await call(msg, timeout=10)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
async def main():
    await asyncio.gather(*(one(i) for i in range(int(conns))))
asyncio.run(main())
print(json.dumps({"bytes_per_call": len(msg), "codes": codes}))
"""


@dataclass
class FloodConfig:
    """Knobs of the flood benchmark."""

    nodes: int = 4
    prompt_tokens: int = 1024
    block_size: int = 16
    duration_s: float = setting(
        5.0, "seconds of steady load, then seconds of load under the flood")
    rate_per_s: float = setting(200.0, "Route calls per second (open loop) while measuring",
                                flag="--flood-rate")
    rogue_hashes: int = setting(1_000_000, "stored hashes in each rogue heartbeat",
                                flag="--flood-hashes")
    rogue_capacity: int = 1000
    rogue_connections: int = setting(4, "rogue connections sending heartbeats back to back",
                                     flag="--flood-connections")
    rss_slack_mb: float = 8.0
    modes: tuple[str, ...] = ("mirror", "stream")
    seed: int = 11


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _workload(cfg: FloodConfig) -> tuple[list[list[int]], dict[str, list[int]]]:
    rng = random.Random(cfg.seed)
    fams = [[rng.randrange(1, 50_000) for _ in range(cfg.prompt_tokens)] for _ in range(16)]
    placement: dict[str, list[int]] = {f"node-{i}": [] for i in range(cfg.nodes)}
    for f, toks in enumerate(fams):
        placement[f"node-{f % cfg.nodes}"].extend(hash_blocks(toks, cfg.block_size))
    reqs = [fam[: cfg.prompt_tokens * 3 // 4] + [rng.randrange(1, 50_000) for _ in range(64)]
            for fam in fams for _ in range(8)]
    return reqs, placement


async def _one_rogue_beat(registry: str, cfg: FloodConfig) -> dict[str, Any]:
    opts = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(registry, options=opts) as ch:
        stub: Any = pb_grpc.RegistryStub(ch)
        reg = await stub.RegisterNode(pb.RegisterNodeRequest(
            node_id="rogue", address="rogue.local:1", model="bench", block_size=cfg.block_size,
            capacity_blocks=cfg.rogue_capacity), timeout=10)
        t0 = time.perf_counter()
        try:
            await stub.Heartbeat(pb.HeartbeatRequest(
                node_id="rogue", epoch=reg.epoch, write_token=reg.write_token,
                stored=range(1, cfg.rogue_hashes + 1), delta_seq=1), timeout=30)
            code, details = "OK", ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        took = time.perf_counter() - t0
        return {"code": code, "details": details, "seconds": round(took, 3),
                "epoch": reg.epoch, "write_token": reg.write_token}


async def _rogue_blocks(registry: str) -> int:
    async with grpc.aio.insecure_channel(registry) as ch:
        nodes = (await pb_grpc.RegistryStub(ch).ListNodes(pb.ListNodesRequest(),
                                                          timeout=10)).nodes
        return sum(n.blocks_indexed for n in nodes if n.node_id == "rogue")


def run_flood_bench(cfg: FloodConfig, log: Any = print) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready result with a verdict."""
    tokens, placement = _workload(cfg)
    out: dict[str, Any] = {"config": asdict(cfg)}
    with tempfile.TemporaryDirectory(prefix="kvroute-flood-") as tmp:
        work = Path(tmp)
        etcd = EmbeddedEtcd(work / "etcd").start()
        procs: list[ManagedProcess] = []
        try:
            reg, reg_ready = _serve("registry", [
                "--block-size", str(cfg.block_size), "--etcd-endpoints", etcd.endpoint,
                "--log-level", "warning"], work, "registry")
            procs.append(reg)
            registry = f"127.0.0.1:{reg_ready['grpc_port']}"
            epochs = asyncio.run(register_nodes(registry, placement, cfg.block_size))
            procs.append(ManagedProcess("heartbeats", [
                sys.executable, "-c", _HB_SCRIPT.format(registry=registry, epochs=epochs)],
                work / "hb.log").start())
            routers: dict[str, tuple[ManagedProcess, str]] = {}
            for mode in cfg.modes:
                rt, rt_ready = _serve("router", [
                    "--registry", registry, "--registry-mode", mode, "--block-size",
                    str(cfg.block_size), "--inflight-timeout-s", "5", "--log-level", "warning"],
                    work, f"router-{mode}")
                procs.append(rt)
                routers[mode] = (rt, f"127.0.0.1:{rt_ready['grpc_port']}")
                _wait_routable(routers[mode][1], tokens[0])
            params = {"rate": cfg.rate_per_s, "duration_s": cfg.duration_s}
            out["steady"], out["flood"] = {}, {}
            for mode, (_, target) in routers.items():
                out["steady"][mode] = measure(target, "route_rate", params, tokens, 1,
                                              f"steady-{mode}")
                log(f"[{mode}] steady Route at {cfg.rate_per_s:g}/s: {out['steady'][mode]}")
            rss0 = {"registry": rss_mb(reg.pid),
                    **{f"router-{m}": rss_mb(p.pid) for m, (p, _) in routers.items()}}
            one = asyncio.run(_one_rogue_beat(registry, cfg))
            log(f"one heartbeat of {cfg.rogue_hashes:,} hashes for a {cfg.rogue_capacity}-block "
                f"node: {one['code']} in {one['seconds']} s: {one['details']}")
            flood_s = len(routers) * (cfg.duration_s + 1.0) + 1.0
            rogue = ManagedProcess("rogue", [
                sys.executable, "-c", ROGUE_SCRIPT, registry, str(one["epoch"]),
                one["write_token"], str(cfg.rogue_hashes), str(flood_s),
                str(cfg.rogue_connections)], work / "rogue.log").start()
            time.sleep(0.5)
            for mode, (_, target) in routers.items():
                out["flood"][mode] = measure(target, "route_rate", params, tokens, 1,
                                             f"flood-{mode}")
                log(f"[{mode}] Route during the flood: {out['flood'][mode]}")
            deadline = time.monotonic() + flood_s + 30
            while rogue.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            rogue.stop()
            rogue_out = (work / "rogue.log").read_text().strip().splitlines()
            out["rogue"] = json.loads(rogue_out[-1]) if rogue_out else {}
            log(f"rogue calls: {out['rogue']}")
            time.sleep(3.0)  # the registry trims its heap within ~2 s once traffic stops
            rss1 = {"registry": rss_mb(reg.pid),
                    **{f"router-{m}": rss_mb(p.pid) for m, (p, _) in routers.items()}}
            blocks = asyncio.run(_rogue_blocks(registry))
            out["steady_after"] = {}
            for mode, (_, target) in routers.items():
                out["steady_after"][mode] = measure(target, "route_rate", params, tokens, 1,
                                                    f"after-{mode}")
                log(f"[{mode}] steady Route again after the flood: {out['steady_after'][mode]}")
        finally:
            for p in reversed(procs):
                p.stop()
            etcd.stop()
    one.pop("write_token", None)
    out["one_heartbeat"] = one
    out["rss_mb_before"], out["rss_mb_after"] = rss0, rss1
    out["rogue_blocks_indexed"] = blocks
    growth = {k: round(rss1[k] - rss0[k], 1) for k in rss0}
    # the steady value around the flood: the windows just before and just after it (other
    # work on a shared machine moves p99 between windows more than a quiet flood would)
    ratio = {m: round(out["flood"][m]["p99_ms"] / max(out["steady"][m]["p99_ms"],
                                                      out["steady_after"][m]["p99_ms"]), 2)
             for m in cfg.modes}
    out["verdict"] = {
        "heartbeat_refused": one["code"] == "RESOURCE_EXHAUSTED",
        "index_unchanged": blocks == 0,
        "rss_growth_mb": growth,
        "rss_within_slack": all(g <= cfg.rss_slack_mb for g in growth.values()),
        "p99_ratio_flood_over_steady": ratio,
        "p99_within_2x": all(r <= 2.0 for r in ratio.values()),
    }
    return out


def add_flood_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``kvroute bench flood`` (prefixed ``--flood-``)."""
    add_value_arguments(p.add_argument_group("flood (kvroute bench flood)"), FloodConfig,
                        prefix="flood-")


def run_flood_cli(args: argparse.Namespace) -> int:
    """``kvroute bench flood``: print the summary, write JSON with --json."""
    cfg = FloodConfig(**value_arguments(FloodConfig, args, prefix="flood-"))
    out = run_flood_bench(cfg)
    text = json.dumps(out, indent=2)
    print(json.dumps(out["verdict"], indent=2))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if all(v for k, v in out["verdict"].items() if isinstance(v, bool)) else 1
