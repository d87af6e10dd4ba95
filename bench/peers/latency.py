"""Router added latency alone, on a small fast fleet, at several prompt sizes.

The replay's own added-latency probe runs on the replay's fleet (compressed engine time, a loaded
machine). This measures only the routers: a 2-engine fleet at ``time_scale`` 0.001 (engine time
nearly nothing), each router in turn, direct-vs-routed pairs at each prompt size — for kvroute the
``Route`` RPC before the engine call, for ``gateway:<policy>`` kvroute's OpenAI gateway (one HTTP
hop, as the peers), for each peer its HTTP hop (or Dynamo's in-process call).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from bench.peers.backend import make_peer
from bench.peers.base import parse_peer, policy_name
from bench.peers.engines import EngineFleet
from bench.peers.overhead import (
    AddedLatency,
    gateway_added_latency,
    kvroute_added_latency,
    peer_added_latency,
)
from bench.stack_fleet import FleetSpec


def latency_spec(base: FleetSpec) -> FleetSpec:
    """``base`` shrunk to 2 fast engines with room for the largest probe."""
    return dataclasses.replace(base, nodes=2, time_scale=0.001,
                               cache_blocks=max(base.cache_blocks, 4096 // base.block_size * 8))


def measure_routers(names: list[str], base: FleetSpec, workdir: Path, sizes: list[int],
                    pairs: int = 200) -> dict[str, dict[int, AddedLatency]]:
    """``names``: kvroute policies through the Route API (``kv_aware``) or the gateway
    (``gateway:kv_aware``), and peers (``peer:router:policy``)."""
    spec = latency_spec(base)
    out: dict[str, dict[int, AddedLatency]] = {}
    for k, name in enumerate(names):
        work = workdir / f"latency-{k:02d}"
        if name.startswith("peer:"):
            router, policy = parse_peer(name)
            out[policy_name(router, policy)] = asyncio.run(_peer(name, spec, work, sizes, pairs))
        else:
            out[name] = _kvroute(name, spec, work, sizes, pairs)
    return out


async def _peer(name: str, spec: FleetSpec, work: Path, sizes: list[int],
                pairs: int) -> dict[int, AddedLatency]:
    peer = make_peer(name)
    res: dict[int, AddedLatency] = {}
    with EngineFleet(work, spec) as fleet:
        try:
            await peer.start(fleet, work)
            for size in sizes:
                res[size] = await peer_added_latency(peer, fleet.engines[0].url, pairs, size)
        finally:
            await peer.stop()
    return res


def _kvroute(policy: str, spec: FleetSpec, work: Path, sizes: list[int],
             pairs: int) -> dict[int, AddedLatency]:
    from bench.stack_backend import StackBackend

    res: dict[int, AddedLatency] = {}
    via_gateway = policy.startswith("gateway:")
    policy = policy.removeprefix("gateway:")
    with StackBackend(work, dataclasses.replace(spec, gateway=via_gateway)) as stack:
        urls = {e.node_id: e.url for e in stack.fleet.engines}
        for size in sizes:
            if via_gateway:
                res[size] = asyncio.run(gateway_added_latency(
                    stack.fleet.gateway_url, urls[sorted(urls)[0]], spec.model, policy, pairs,
                    size))
            else:
                res[size] = asyncio.run(kvroute_added_latency(
                    stack.fleet.router_target, urls, spec.model, policy, pairs, size))
    return res


def format_latency(table: dict[str, dict[int, AddedLatency]]) -> str:
    """One line per router: added ms (median of pairs) per prompt size."""
    sizes = sorted({s for row in table.values() for s in row})
    head = f"{'router':<34}" + "".join(f"{f'+ms @{s} tok':>16}" for s in sizes) + \
        f"{'direct ms @' + str(sizes[0]):>18}"
    lines = [head]
    for name, row in table.items():
        cells = "".join(f"{row[s].added_ms:>16.2f}" for s in sizes)
        lines.append(f"{name:<34}{cells}{row[sizes[0]].direct_ms:>18.2f}")
    return "\n".join(lines)
