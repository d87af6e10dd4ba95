"""A router's added latency per request: the same requests straight to an engine vs through it.

Sequential pairs on one keep-alive session (direct, then routed, alternating which goes first),
each request a fresh random prompt (no prefix shared with anything, so no cache state differs
between the two). ``added_ms`` is the median of the per-pair differences (wall milliseconds);
the engine's own (compressed) latency is in both and cancels out.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import grpc

from bench.peers.base import Peer
from bench.prompts import Prompt
from bench.workloads.base import TraceRequest
from kvroute.v1 import router_pb2, router_pb2_grpc


@dataclass(frozen=True)
class AddedLatency:
    """Median wall milliseconds per request."""

    direct_ms: float
    routed_ms: float
    added_ms: float
    pairs: int

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _probe(k: int, prompt_tokens: int, rng: random.Random) -> tuple[TraceRequest, list[int]]:
    req = TraceRequest(f"overhead-{k}-{rng.getrandbits(32):08x}", 0.0, (), prompt_tokens, 1)
    return req, [rng.randrange(1, 32_000) for _ in range(prompt_tokens)]


async def _pairs(direct: Callable[[TraceRequest, list[int]], Awaitable[str]],
                 routed: Callable[[TraceRequest, list[int]], Awaitable[str]],
                 pairs: int, prompt_tokens: int, seed: int) -> AddedLatency:
    rng = random.Random(seed)
    d_ms: list[float] = []
    r_ms: list[float] = []
    for k in range(pairs + 2):  # the first two pairs warm connections up
        order = [("d", direct), ("r", routed)] if k % 2 == 0 else [("r", routed), ("d", direct)]
        got: dict[str, float] = {}
        for tag, call in order:
            req, toks = _probe(k, prompt_tokens, rng)
            t0 = time.perf_counter()
            err = await call(req, toks)
            if err:
                raise RuntimeError(f"added-latency probe failed ({tag}): {err}")
            got[tag] = (time.perf_counter() - t0) * 1000.0
        if k >= 2:
            d_ms.append(got["d"])
            r_ms.append(got["r"])
    diffs = [r - d for r, d in zip(r_ms, d_ms, strict=True)]
    return AddedLatency(statistics.median(d_ms), statistics.median(r_ms),
                        statistics.median(diffs), pairs)


async def peer_added_latency(peer: Peer, engine_url: str, pairs: int = 100,
                             prompt_tokens: int = 2048, seed: int = 0) -> AddedLatency:
    """``peer`` (started) vs the same request body straight to ``engine_url``."""
    async with aiohttp.ClientSession() as http:
        async def direct(req: TraceRequest, toks: list[int]) -> str:
            return (await peer.send(http, req, Prompt(toks), direct_url=engine_url)).error

        async def routed(req: TraceRequest, toks: list[int]) -> str:
            return (await peer.send(http, req, Prompt(toks))).error

        return await _pairs(direct, routed, pairs, prompt_tokens, seed)


async def kvroute_added_latency(router_target: str, engine_urls: dict[str, str], model: str,
                                policy: str = "kv_aware", pairs: int = 100,
                                prompt_tokens: int = 2048, seed: int = 0) -> AddedLatency:
    """kvroute's path: ``Router.Route`` then the engine (``Complete`` after the response, as a
    gateway sends it, is not counted) vs the same request straight to the first engine."""
    first = engine_urls[sorted(engine_urls)[0]]
    channel = grpc.aio.insecure_channel(router_target)
    stub = router_pb2_grpc.RouterStub(channel)
    try:
        async with aiohttp.ClientSession() as http:
            async def engine(url: str, req: TraceRequest, toks: list[int]) -> str:
                body = {"model": model, "prompt": toks, "max_tokens": 1,
                        "user": req.request_id}
                async with http.post(url + "/v1/completions", json=body) as resp:
                    await resp.read()
                    return "" if resp.status == 200 else f"engine {resp.status}"

            async def direct(req: TraceRequest, toks: list[int]) -> str:
                return await engine(first, req, toks)

            async def routed(req: TraceRequest, toks: list[int]) -> str:
                d = await stub.Route(router_pb2.RouteRequest(
                    request_id=req.request_id, model=model, token_ids=toks, policy=policy,
                    max_output_tokens=1), timeout=10)
                err = await engine(engine_urls[d.node_id], req, toks)
                completes.append(asyncio.ensure_future(stub.Complete(
                    router_pb2.CompleteRequest(request_id=req.request_id, success=not err),
                    timeout=10)))
                return err

            completes: list[asyncio.Future[Any]] = []
            try:
                return await _pairs(direct, routed, pairs, prompt_tokens, seed)
            finally:
                await asyncio.gather(*completes, return_exceptions=True)
    finally:
        await channel.close(None)


async def gateway_added_latency(gateway_url: str, engine_url: str, model: str,
                                policy: str = "kv_aware", pairs: int = 100,
                                prompt_tokens: int = 2048, seed: int = 0) -> AddedLatency:
    """kvroute's OpenAI gateway (one HTTP hop that decides in-process, like the peers' HTTP
    routers) vs the same request body straight to ``engine_url``."""
    async with aiohttp.ClientSession() as http:
        async def post(url: str, req: TraceRequest, toks: list[int],
                       headers: dict[str, str] | None) -> str:
            body = {"model": model, "prompt": toks, "max_tokens": 1, "user": req.request_id}
            async with http.post(url + "/v1/completions", json=body, headers=headers) as resp:
                await resp.read()
                return "" if resp.status == 200 else f"{url} {resp.status}"

        async def direct(req: TraceRequest, toks: list[int]) -> str:
            return await post(engine_url, req, toks, None)

        async def routed(req: TraceRequest, toks: list[int]) -> str:
            return await post(gateway_url, req, toks, {"x-kvroute-policy": policy})

        return await _pairs(direct, routed, pairs, prompt_tokens, seed)
