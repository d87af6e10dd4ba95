"""The peers as a :class:`bench.backend.Backend`, and a backend that mixes them with kvroute's.

``PeerBackend.replay(workload, "peer:vllm-router:kv_aware")`` starts a fresh engine_sim fleet
(the :class:`bench.stack_fleet.FleetSpec` kvroute's stack runs on: same cache, latency model,
time compression, caches empty), starts the peer, replays, measures the router's added latency,
and stops everything it started by pid. ``CombinedBackend`` sends ``peer:*`` names to a
PeerBackend and everything else to kvroute's StackBackend, so one ``run_comparison`` call puts
both in one report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.backend import Backend
from bench.peers.base import Peer, parse_peer, policy_name
from bench.peers.engines import EngineFleet
from bench.peers.overhead import (
    AddedLatency,
    gateway_added_latency,
    kvroute_added_latency,
    peer_added_latency,
)
from bench.peers.replay import replay_peer
from bench.prompts import Prompt, prepare
from bench.results import PolicyRun
from bench.stack_fleet import FleetSpec
from bench.workloads.base import Workload


def make_peer(name: str) -> Peer:
    """The adapter for ``<router>:<policy>``; raises RuntimeError when it is not installed."""
    router, policy = parse_peer(name)
    if router == "sglang-router":
        from bench.peers import sglang_router as mod_s

        why = mod_s.available()
        peer: Peer = mod_s.SglangRouterPeer(policy)
    elif router == "vllm-router":
        from bench.peers import vllm_router as mod_v

        why = mod_v.available()
        peer = mod_v.VllmRouterPeer(policy)
    else:
        from bench.peers import dynamo as mod_d

        why = mod_d.available()
        peer = mod_d.DynamoPeer(policy)
    if why:
        raise RuntimeError(why)
    return peer


class PeerBackend:
    """Replays ``peer:<router>:<policy>`` names, each on its own fresh engine fleet."""

    mode = "stack"

    def __init__(self, workdir: Path, spec: FleetSpec,
                 progress: Callable[[int], None] | None = None,
                 overhead_pairs: int = 100) -> None:
        self.workdir = workdir
        self.spec = spec
        self.progress = progress
        self.overhead_pairs = overhead_pairs
        self.added_latency: dict[str, AddedLatency] = {}
        """Per policy name: the router's added latency (filled by each replay)."""
        self._runs = 0
        self._prompts: tuple[Workload, list[Prompt]] | None = None
        """The last workload's prepared prompts (reused by every peer)."""

    def replay(self, workload: Workload, policy_name_: str) -> PolicyRun:
        """Fresh fleet, start the peer, replay, measure added latency, stop everything."""
        return asyncio.run(self._replay(workload, policy_name_))

    async def _replay(self, workload: Workload, name: str) -> PolicyRun:
        router, policy = parse_peer(name)
        label = policy_name(router, policy)
        peer = make_peer(name)
        self._runs += 1
        work = self.workdir / f"{self._runs:02d}-{router}-{policy}"
        work.mkdir(parents=True, exist_ok=True)
        # Payloads before any process starts: the replay then begins as soon as the router is
        # healthy, the same few wall seconds after its start in every run and for every peer
        # (the peers' wall-clock timers count from their start).
        if self._prompts is None or self._prompts[0] is not workload:
            self._prompts = (workload, prepare(workload))
        with EngineFleet(work, self.spec) as fleet:
            try:
                await peer.start(fleet, work)
                run = await replay_peer(workload, peer, label, fleet, self.progress,
                                        prompts=self._prompts[1])
                if self.overhead_pairs > 0:
                    lat = await peer_added_latency(peer, fleet.engines[0].url,
                                                   pairs=self.overhead_pairs)
                    self.added_latency[label] = lat
                    run.notes.append(f"added latency per request: median {lat.added_ms:.2f} ms "
                                     f"(direct {lat.direct_ms:.2f} ms, through the router "
                                     f"{lat.routed_ms:.2f} ms, {lat.pairs} pairs)")
            finally:
                await peer.stop()
        return run


class CombinedBackend:
    """``peer:*`` → :class:`PeerBackend`, anything else → kvroute's stack backend."""

    mode = "stack"

    def __init__(self, stack: Backend, peers: PeerBackend, measure_kvroute: bool = True) -> None:
        self.stack = stack
        self.peers = peers
        self.measure_kvroute = measure_kvroute
        self.added_latency = peers.added_latency

    def replay(self, workload: Workload, policy_name_: str) -> PolicyRun:
        """Dispatch by name; kvroute rows also get their Route added latency measured.

        The first peer stops kvroute's fleet (``close()`` of the stack backend, when it has
        one): its idle agents and engines must not take CPU from the peers' fleets.
        """
        if policy_name_.startswith("peer:"):
            close: Any = getattr(self.stack, "close", None)
            if close is not None:
                close()
            return self.peers.replay(workload, policy_name_)
        run = self.stack.replay(workload, policy_name_)
        fleet: Any = getattr(self.stack, "fleet", None)
        if self.measure_kvroute and fleet is not None and self.peers.overhead_pairs > 0:
            urls = {e.node_id: e.url for e in fleet.engines}
            if policy_name_.startswith("gateway:"):
                lat = asyncio.run(gateway_added_latency(
                    fleet.gateway_url, urls[sorted(urls)[0]], self.peers.spec.model,
                    policy=policy_name_.removeprefix("gateway:"),
                    pairs=self.peers.overhead_pairs))
                self.added_latency[policy_name_] = lat
                run.notes.append(f"added latency per request (OpenAI gateway, one HTTP hop): "
                                 f"median {lat.added_ms:.2f} ms (direct {lat.direct_ms:.2f} ms, "
                                 f"routed {lat.routed_ms:.2f} ms)")
                return run
            lat = asyncio.run(kvroute_added_latency(
                fleet.router_target, urls, self.peers.spec.model, policy=policy_name_,
                pairs=self.peers.overhead_pairs))
            self.added_latency[policy_name_] = lat
            run.notes.append(f"added latency per request (Route RPC): median {lat.added_ms:.2f} "
                             f"ms (direct {lat.direct_ms:.2f} ms, routed {lat.routed_ms:.2f} ms)")
        return run


def attach_added_latency(report: dict[str, Any], added: dict[str, AddedLatency]) -> None:
    """Add ``added_latency_ms`` ({direct_ms, routed_ms, added_ms, pairs}) to each result row."""
    for row in report.get("results", []):
        lat = added.get(row.get("policy", ""))
        if lat is not None:
            row["added_latency_ms"] = lat.as_dict()


def run_peers(workload: Workload, spec: FleetSpec, peers: list[str], workdir: Path,
              progress: Callable[[int], None] | None = None,
              overhead_pairs: int = 100) -> tuple[list[PolicyRun], dict[str, AddedLatency]]:
    """Replay ``workload`` through each peer (``router:policy``), each on a fresh fleet."""
    backend = PeerBackend(workdir, spec, progress, overhead_pairs)
    runs = [backend.replay(workload, name if name.startswith("peer:") else f"peer:{name}")
            for name in peers]
    return runs, backend.added_latency
