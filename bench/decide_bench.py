"""``kvroute bench decide``: in-process cost of one routing decision and one registry Lookup.

Per fleet size (``--nodes 8,128,1024``), in this process, no network:

- **router**: a :class:`~router_service.core.RouterCore` built exactly as ``kvroute serve router``
  builds it (mirror mode), its index mirror fed with the ``WatchPlacement`` events a registry
  would send, routing prompts of ``--prompt-blocks`` blocks of token ids (hashing, mirror lookup,
  load tracker, policy) and completing each request before the next;
- **registry**: a :class:`~registry_service.core.RegistryCore` on the memory store, nodes
  registered and resynced through its own write path, answering the same prompts' Lookup
  through the servicer's handler as the router's stream mode asks it on a fleet larger than
  ``--max-candidates`` (``matched_only``: validation, index walk, one NodeMatch per node
  holding a prefix, the model's node count); ``lookup_all_nodes`` is the default answer (one
  NodeMatch per node of the model, so it grows with the fleet by construction).

The fleet: every node caches ``--blocks-per-node`` blocks of its own plus prefixes (random
lengths) of shared documents, each document on ``--holders`` nodes, so a prompt matches a few
nodes and misses the rest, as in a real fleet. Besides p50/p99 of the whole call, the JSON gives
the placement parts alone, to show which part grows with the fleet: ``mirror_lookup`` (the
router mirror's answer, every node of the model with its match), ``mirror_match`` and
``registry_match`` (the index walk alone: only the nodes holding a prefix).

Times are CPU time of the deciding thread (``time.thread_time``), not wall time: on a shared
machine a process waiting for a core would otherwise show up as decision cost (the p99 still
includes cache misses and allocator work).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvroute.blocks import hash_blocks
from kvroute.errors import ConfigError
from kvroute.index import HashArray
from kvroute.settings import add_value_arguments, setting, value_arguments
from kvroute.v1 import registry_pb2 as rpb

TARGET_RATIO = 2.0
"""Done when p50 at the largest fleet <= this x p50 at the smallest (router and Lookup)."""
MODEL = "bench-model"


@dataclass(frozen=True)
class DecideBenchConfig:
    """Parameters of one ``kvroute bench decide`` run."""

    nodes: tuple[int, ...] = setting((8, 128, 1024), "fleet sizes to measure (default "
                                                     "%(default)s)", metavar="N,N,...")
    prompt_blocks: int = setting(64, "blocks per routed prompt (default %(default)s)",
                                 metavar="B")
    block_size: int = setting(16, "tokens per block (default %(default)s)")
    blocks_per_node: int = setting(
        1000, "blocks each node caches besides shared prefixes (default %(default)s)",
        metavar="K")
    documents: int = setting(256, "distinct shared prompts (default %(default)s)")
    holders: int = setting(4, "nodes caching a prefix of each prompt (default %(default)s)")
    decisions: int = setting(
        2000, "decisions (and Lookups) measured per fleet size (default %(default)s)")
    policy: str = setting("kv_aware", "router policy (default %(default)s)")
    seed: int = setting(0, "seed of the synthetic fleet")
    gc: bool = setting(True, "turn Python's garbage collector off while measuring (its full "
                             "collections are the router's p99 at 1,024 nodes)")
    """False (``--no-gc``): Python's garbage collector is off for the run (shows its share of
    the p99)."""


@dataclass
class Fleet:
    """Synthetic placement: per node its block hashes and usage; the prompts to route."""

    nodes: list[str]
    blocks: dict[str, HashArray]
    """Per node (numpy, so the bench's own data adds nothing to the garbage collector's
    passes, which would otherwise show in the measured p99)."""
    queue: dict[str, int]
    prompts: list[np.ndarray] = field(default_factory=list)
    prompt_hashes: list[list[int]] = field(default_factory=list)


def make_fleet(cfg: DecideBenchConfig, n: int) -> Fleet:
    """``n`` nodes, shared documents on ``holders`` nodes each, filler blocks per node."""
    rng = random.Random(cfg.seed * 7919 + n)
    nrng = np.random.default_rng(cfg.seed * 7919 + n)
    nodes = [f"node-{i:04d}" for i in range(n)]
    extra: dict[str, list[int]] = {nid: [] for nid in nodes}
    fleet = Fleet(nodes, {}, {nid: rng.randrange(0, 4) for nid in nodes})
    tokens = cfg.prompt_blocks * cfg.block_size
    for _ in range(cfg.documents):
        doc = nrng.integers(0, 50_000, size=tokens, dtype=np.uint32)
        hashes = hash_blocks(doc, cfg.block_size)
        for nid in rng.sample(nodes, min(cfg.holders, n)):
            extra[nid].extend(hashes[:rng.randrange(1, len(hashes) + 1)])
        fleet.prompts.append(doc)
        fleet.prompt_hashes.append(hashes)
    for nid in nodes:
        own = nrng.integers(1, 2**63, size=cfg.blocks_per_node, dtype=np.uint64)
        fleet.blocks[nid] = np.concatenate([own, np.array(extra[nid], dtype=np.uint64)])
    return fleet


def _capacity(cfg: DecideBenchConfig) -> int:
    return 4 * (cfg.blocks_per_node + cfg.prompt_blocks)


def _named(name: str, samples: list[float]) -> dict[str, float]:
    arr = np.array(samples) * 1e6
    return {f"{name}_p50_us": round(float(np.percentile(arr, 50)), 1),
            f"{name}_p99_us": round(float(np.percentile(arr, 99)), 1)}


# -- router ------------------------------------------------------------------------------------
def _router(cfg: DecideBenchConfig, fleet: Fleet) -> dict[str, float]:
    from router_service.domain import RouteRequest
    from router_service.mirror_source import MirrorSource
    from router_service.runtime import build_core
    from router_service.settings import RouterSettings

    s = RouterSettings(registry="127.0.0.1:1", registry_mode="mirror",
                       default_policy=cfg.policy, block_size=cfg.block_size,
                       mirror_max_staleness_s=1e9)
    core = build_core(s, {}, None)
    source = core.source
    assert isinstance(source, MirrorSource)
    mirror = source.mirror
    PE = rpb.PlacementEvent
    for nid in fleet.nodes:
        info = rpb.NodeInfo(node_id=nid, address=f"{nid}:8000", model=MODEL, healthy=True,
                            capacity_blocks=_capacity(cfg),
                            used_blocks=len(fleet.blocks[nid]), queue_depth=fleet.queue[nid])
        mirror.apply(PE(kind=PE.NODE_UPSERT, node_id=nid, node=info,
                        block_size=cfg.block_size))
        mirror.apply(PE(kind=PE.BLOCKS, node_id=nid, cleared=True,
                        stored=fleet.blocks[nid].tolist()))
    mirror.apply(PE(kind=PE.SNAPSHOT_END, block_size=cfg.block_size))
    rng = random.Random(cfg.seed)
    picks = [rng.randrange(len(fleet.prompts)) for _ in range(cfg.decisions)]

    def run() -> tuple[list[float], list[float], list[float]]:
        decide: list[float] = []
        lookup: list[float] = []
        match: list[float] = []
        clock = time.thread_time
        for i, p in enumerate(picks):
            req = RouteRequest(request_id=f"r{i}", model=MODEL, token_ids=fleet.prompts[p])
            t0 = clock()
            d = core.decide_local(req)
            decide.append(clock() - t0)
            core.complete(d.request_id)
            hashes = fleet.prompt_hashes[p]
            t0 = clock()
            mirror.lookup(hashes, MODEL)
            lookup.append(clock() - t0)
            t0 = clock()
            mirror.matches(hashes, MODEL)
            match.append(clock() - t0)
        return decide, lookup, match

    decide, lookup, match = run()
    return {**_named("router", decide), **_named("mirror_lookup", lookup),
            **_named("mirror_match", match)}


# -- registry ----------------------------------------------------------------------------------
def _registry(cfg: DecideBenchConfig, fleet: Fleet) -> dict[str, float]:
    from registry_service.core import RegistryCore
    from registry_service.metrics import RegistryMetrics
    from registry_service.servicer import RegistryServicer
    from registry_service.settings import RegistrySettings
    from registry_service.store.memory import MemoryStore

    settings = RegistrySettings(block_size=cfg.block_size, max_nodes=max(4096, len(fleet.nodes)),
                                lease_ttl_s=3600, heartbeat_interval_s=600.0,
                                max_hashes_per_call=1_000_000,
                                # the bench sizes the fleet; the registry's memory bounds
                                # (issue 16) must not cut it short
                                max_blocks_per_node=1 << 40, max_index_entries=1 << 40)
    rng = random.Random(cfg.seed)
    picks = [rng.randrange(len(fleet.prompts)) for _ in range(cfg.decisions)]

    async def resync_stream(nid: str, epoch: int, token: str,
                            ) -> AsyncIterator[rpb.ResyncRequest]:
        yield rpb.ResyncRequest(node_id=nid, epoch=epoch,
                                block_hashes=fleet.blocks[nid].tolist(),
                                used_blocks=len(fleet.blocks[nid]), write_token=token)

    async def run() -> tuple[list[float], list[float], list[float]]:
        core = RegistryCore(settings, MemoryStore(), RegistryMetrics())
        await core.start()
        try:
            for nid in fleet.nodes:
                reg = await core.register(rpb.RegisterNodeRequest(
                    node_id=nid, address=f"{nid}:8000", model=MODEL,
                    block_size=cfg.block_size, capacity_blocks=_capacity(cfg)))
                await core.resync(resync_stream(nid, reg.record.epoch, reg.write_token))
            servicer = RegistryServicer(core, "bench")
            clock = time.thread_time

            def measure(matched_only: bool) -> list[float]:
                out: list[float] = []
                for i, p in enumerate(picks):
                    req = rpb.LookupRequest(block_hashes=fleet.prompt_hashes[p], model=MODEL,
                                            request_id=str(i), include_unhealthy=True,
                                            matched_only=matched_only)
                    t0 = clock()
                    resp = servicer.lookup(req)
                    out.append(clock() - t0)
                    assert resp.model_nodes == len(fleet.nodes)
                    assert (0 < len(resp.nodes) <= cfg.holders if matched_only
                            else len(resp.nodes) == len(fleet.nodes))
                return out

            # each kind in its own loop, as a caller sends it (a loop of full answers, 1,024
            # messages each, would leave the next matched-only one a cold cache)
            # as the router's stream mode asks on a fleet larger than --max-candidates: only
            # the nodes holding a prefix (every node of the model is counted)
            only = measure(True)
            full = measure(False)  # the default answer: every node of the model
            match: list[float] = []
            for p in picks:
                hashes = fleet.prompt_hashes[p]
                t0 = clock()
                core.view.lookup(hashes, MODEL)
                match.append(clock() - t0)
            return only, full, match
        finally:
            await core.close()

    only, full, match = asyncio.run(run())
    return {**_named("lookup", only), **_named("lookup_all_nodes", full),
            **_named("registry_match", match)}


def run_decide_bench(cfg: DecideBenchConfig,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every fleet size; ``{"results": [...], "config": ..., "verdict": ...}``."""
    results: list[dict[str, Any]] = []
    for n in cfg.nodes:
        fleet = make_fleet(cfg, n)
        row: dict[str, Any] = {"nodes": n}
        was_on = gc.isenabled()
        if not cfg.gc:
            gc.disable()
        try:
            row.update(_router(cfg, fleet))
            row.update(_registry(cfg, fleet))
        finally:
            if was_on:
                gc.enable()
        row["entries"] = sum(len(b) for b in fleet.blocks.values())
        results.append(row)
        if progress is not None:
            progress(f"{n:>5} nodes: router decision p50 {row['router_p50_us']:7.1f} p99 "
                     f"{row['router_p99_us']:7.1f} us (mirror lookup "
                     f"{row['mirror_lookup_p50_us']:.1f}, match {row['mirror_match_p50_us']:.1f})"
                     f" | registry Lookup p50 {row['lookup_p50_us']:7.1f} p99 "
                     f"{row['lookup_p99_us']:7.1f} us (match "
                     f"{row['registry_match_p50_us']:.1f}; every node listed "
                     f"{row['lookup_all_nodes_p50_us']:.1f})")
    first, last = results[0], results[-1]
    verdict: dict[str, Any] = {"target_ratio": TARGET_RATIO}
    for key in ("router", "lookup", "lookup_all_nodes", "mirror_lookup", "mirror_match",
                "registry_match"):
        ratio = last[f"{key}_p50_us"] / max(first[f"{key}_p50_us"], 1e-9)
        verdict[f"{key}_p50_ratio"] = round(ratio, 2)
        if key in ("router", "lookup"):
            verdict[f"{key}_met"] = ratio <= TARGET_RATIO
    return {"results": results, "config": {**asdict(cfg), "nodes": list(cfg.nodes)},
            "verdict": verdict}


# -- CLI (``kvroute bench decide``) ------------------------------------------------------------
def add_decide_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``kvroute bench decide``."""
    add_value_arguments(p, DecideBenchConfig)


def config_from_args(args: argparse.Namespace) -> DecideBenchConfig:
    """The config, or ConfigError naming the flag."""
    given = value_arguments(DecideBenchConfig, args)
    try:
        nodes = tuple(int(x) for x in given["nodes"].split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--nodes: expected N,N,... got {given['nodes']!r}") from None
    if not nodes or min(nodes) < 1:
        raise ConfigError("--nodes: give one or more fleet sizes >= 1")
    for name in ("prompt_blocks", "block_size", "documents", "holders", "decisions"):
        if given[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1")
    if given["blocks_per_node"] < 0:
        raise ConfigError("--blocks-per-node: must be >= 0")
    return DecideBenchConfig(**{**given, "nodes": nodes})


def run_decide_cli(args: argparse.Namespace) -> int:
    """``kvroute bench decide``: a line per fleet size, the verdict, JSON with --json."""
    cfg = config_from_args(args)
    out = run_decide_bench(cfg, progress=print)
    print(json.dumps(out["verdict"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
