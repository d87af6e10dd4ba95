"""A short head-to-head: each real peer router replays the same workload on a fresh fleet.

Proves, per peer: every request was routed and served (no failures, every request in exactly one
engine's records), the run's per-request node, cached tokens and prompt tokens are the engines'
own records (read back from ``/kvroute/stats`` here, independently of the replay), concurrent
arrivals really overlapped, and the added-latency probe ran. vllm-router kv_aware must also have
indexed the engines' KV events (placement lookups that hit). Needs the ``[peers]`` extra.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench.metrics import policy_metrics
from bench.peers import make_peer, parse_peer
from bench.peers.base import policy_name
from bench.peers.engines import EngineFleet
from bench.peers.overhead import peer_added_latency
from bench.peers.replay import replay_peer
from bench.results import PolicyRun
from bench.stack_fleet import FleetSpec
from bench.workloads.base import TraceRequest, Workload

pytestmark = [pytest.mark.peers, pytest.mark.integration]

SPEC = FleetSpec(nodes=2, cache_blocks=96, block_size=16, prefill_tokens_per_s=6000.0,
                 decode_ms_per_token=10.0, max_running=16, time_scale=0.1)


def _workload() -> Workload:
    """4 shared 8-block prefixes x 10 requests, each with 2 blocks of its own, interleaved."""
    reqs = []
    for k in range(40):
        group = k % 4
        shared = [1000 * (group + 1) + b for b in range(8)]
        hashes = (*shared, 50_000 + 2 * k, 50_001 + 2 * k)
        reqs.append(TraceRequest(f"h2h-{k}", 0.02 * k, hashes, 160, 4))
    return Workload("h2h-test", 16, reqs, "tests/peers/test_head_to_head.py")


def _stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/kvroute/stats", timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


async def _head_to_head(name: str, tmp: Path) -> tuple[PolicyRun, dict[str, dict[str, Any]],
                                                        float]:
    router, policy = parse_peer(name)
    try:
        peer = make_peer(name)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    wl = _workload()
    with EngineFleet(tmp, SPEC) as fleet:
        try:
            await peer.start(fleet, tmp)
            run = await replay_peer(wl, peer, policy_name(router, policy), fleet)
            records = {e.node_id: _stats(e.url) for e in fleet.engines}
            lat = await peer_added_latency(peer, fleet.engines[0].url, pairs=5, prompt_tokens=256)
        finally:
            await peer.stop()
    return run, records, lat.added_ms


@pytest.mark.parametrize("name", ["sglang-router:cache_aware", "vllm-router:kv_aware",
                                  "dynamo:kv"])
def test_peer_routes_every_request_and_numbers_come_from_engines(name: str,
                                                                 tmp_path: Path) -> None:
    run, stats, added_ms = asyncio.run(_head_to_head(name, tmp_path))
    wl = _workload()
    assert run.policy == f"peer:{name}"
    assert run.failed == 0, run.notes
    assert all(n >= 0 for n in run.node)
    # the engines' own records, read here: each request on exactly one engine, same numbers
    where: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for node, st in stats.items():
        for rec in st["records"]:
            where.setdefault(rec["request_id"], []).append((node, rec))
    for i, req in enumerate(wl.requests):
        [(node, rec)] = where[req.request_id]
        assert run.node_ids[run.node[i]] == node
        assert run.cached_tokens[i] == rec["cached_tokens"]
        assert run.prompt_tokens[i] == rec["prompt_tokens"] == req.prompt_tokens
        assert math.isclose(run.ttft_s[i], rec["first_token_at"] - rec["arrival"])
    m = policy_metrics(run, merged_lru_hit=0.75, oracle_hit=0.75)
    assert sum(m["requests_per_node"]) == len(wl.requests)
    # shared 8-of-10-block prefixes: any router's engines serve a good share from cache
    assert m["hit_rate_tokens"] > 0.4, m
    # real concurrency: some requests were in flight together on the engines
    assert any(sum(counts) > 1 for _, counts in run.load_samples)
    assert math.isfinite(added_ms)
    if name == "vllm-router:kv_aware":
        lookups = next(n for n in run.notes if n.startswith("kv_aware placement lookups"))
        hit = re.search(r"\bhit (\d+)", lookups)
        assert hit is not None and int(hit.group(1)) > 0, lookups  # it indexed our events


def test_sglang_router_pd_peer_in_the_stack_bench(tmp_path: Path) -> None:
    """``kvroute bench --mode stack --pd-peers sglang-router:P/D``: sglang-router's PD mode in
    front of the same P+D fleet; every request has a prefill and a decode record."""
    from cli.main import main

    out = tmp_path / "pd.json"
    assert main(["bench", "--workload", "conversations", "--limit", "60", "--cache-blocks",
                 "2500", "--no-progress", "--mode", "stack", "--time-scale", "0.05",
                 "--prefill-nodes", "1", "--decode-nodes", "2",
                 "--pd-strategies", "kv_aware/kv_aware",
                 "--pd-peers", "sglang-router:cache_aware/power_of_two",
                 "--workdir", str(tmp_path / "stack"), "--json", str(out)]) == 0
    by = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
    peer = by["sglang-router-pd:cache_aware/power_of_two"]
    assert peer["failed"] == 0 and sum(peer["requests_per_decode_node"]) == 60
    assert peer["transferred_blocks"] > 0 and peer["hit_rate_tokens"] > 0
