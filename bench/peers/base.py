"""What every peer router adapter provides, and the names the bench accepts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp

from bench.peers.engines import EngineFleet
from bench.prompts import JSON_HEADERS, Prompt
from bench.workloads.base import TraceRequest

PEER_POLICIES: dict[str, tuple[str, ...]] = {
    "sglang-router": ("cache_aware", "round_robin", "power_of_two"),
    "vllm-router": ("cache_aware", "kv_aware"),
    "dynamo": ("kv",),
}
"""Router → policies the head-to-head can run (``--peers sglang-router:cache_aware,...``)."""

PEER_NAMES: tuple[str, ...] = tuple(f"{r}:{p}" for r, ps in PEER_POLICIES.items() for p in ps)
"""Every ``<router>:<policy>`` accepted by :func:`parse_peer`."""

DEFAULT_PEERS: tuple[str, ...] = ("sglang-router:cache_aware", "vllm-router:cache_aware",
                                  "vllm-router:kv_aware", "dynamo:kv")
"""The peers of the documented default head-to-head."""

HUB_GUARD = "http://127.0.0.1:9"
"""``HF_ENDPOINT`` for every peer: a model-hub download fails on loopback instead of leaving."""


def scaled_interval_s(default_s: int, time_scale: float) -> int:
    """A peer's wall-clock interval scaled by the fleet's time compression (whole seconds, at
    least 1): under ``time_scale`` 0.2 the engines run 5x fast, so a timer that fires every
    ``default_s`` seconds at real speed fires every ``default_s`` x 0.2 wall seconds here — the
    same rate per trace second the router would see in production. The setting's meaning is
    unchanged (PEERS.md, "Driving them fairly": the peers' own timers)."""
    return max(1, round(default_s * time_scale))


def parse_peer(name: str) -> tuple[str, str]:
    """``sglang-router:cache_aware`` or ``peer:sglang-router:cache_aware`` → (router, policy)."""
    bare = name.removeprefix("peer:")
    router, _, policy = bare.partition(":")
    if router not in PEER_POLICIES or policy not in PEER_POLICIES[router]:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEER_NAMES)}")
    return router, policy


def policy_name(router: str, policy: str) -> str:
    """The ``policy`` field of a peer's result row."""
    return f"peer:{router}:{policy}"


@dataclass
class SendResult:
    """What the client saw for one request (the engine's records stay the source of truth)."""

    error: str = ""
    predicted_cached_tokens: int = 0
    """Cached tokens the router said it expected (only Dynamo reports one)."""


class Peer(Protocol):
    """One peer router in front of an :class:`EngineFleet`."""

    router: str
    policy: str

    async def start(self, fleet: EngineFleet, workdir: Path) -> None:
        """Start the router (its own process, or in-process) and wait until it routes."""
        ...

    async def send(self, http: aiohttp.ClientSession, req: TraceRequest, prompt: Prompt,
                   direct_url: str | None = None) -> SendResult:
        """Send ``req`` through the router; with ``direct_url`` the same request straight to
        that engine (for the added-latency measurement)."""
        ...

    async def notes(self, http: aiohttp.ClientSession) -> list[str]:
        """After a replay: checks a reader needs (e.g. the router indexed the engines' events)."""
        ...

    async def stop(self) -> None:
        """Stop what :meth:`start` started (by pid); safe to call twice."""
        ...


async def post_json(http: aiohttp.ClientSession, url: str, body: bytes) -> str:
    """POST the JSON ``body`` (pre-encoded); ``""`` on 200, else a short error."""
    try:
        async with http.post(url, data=body, headers=JSON_HEADERS) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return f"{url.rsplit('/', 1)[-1]} {resp.status}: {raw[:200]!r}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{url}: {exc!r}"
    return ""
