"""Real peer routers (sglang-router, vllm-router, Dynamo's KvRouter) head-to-head with kvroute.

Each peer replays the same workload on its own fresh engine_sim fleet and is measured by the
engines' own records, the same way kvroute's stack replay is. See README.md.
"""

from __future__ import annotations

import dataclasses

from bench.peers.backend import (
    CombinedBackend,
    PeerBackend,
    attach_added_latency,
    make_peer,
    run_peers,
)
from bench.peers.base import DEFAULT_PEERS, PEER_NAMES, PEER_POLICIES, parse_peer
from bench.sim.config import SimSettings
from bench.stack_fleet import FleetSpec


def spec_from_settings(settings: SimSettings, time_scale: float, **over: object) -> FleetSpec:
    """The engine fleet for bench ``settings`` (as ``kvroute demo`` builds it)."""
    spec = FleetSpec(nodes=settings.nodes, cache_blocks=settings.cache_blocks,
                     block_size=settings.block_size,
                     prefill_tokens_per_s=settings.prefill_tokens_per_s,
                     decode_ms_per_token=settings.decode_s_per_token * 1000.0,
                     max_running=settings.max_batch, time_scale=time_scale)
    return dataclasses.replace(spec, **over) if over else spec  # type: ignore[arg-type]


__all__ = [
    "DEFAULT_PEERS",
    "PEER_NAMES",
    "PEER_POLICIES",
    "CombinedBackend",
    "PeerBackend",
    "attach_added_latency",
    "make_peer",
    "parse_peer",
    "run_peers",
    "spec_from_settings",
]
