"""``python -m bench.peers.dynamo_server``: Dynamo's KvRouter as a router process on loopback.

ai-dynamo-runtime 1.6 is a library, not a router binary, so this process plays Dynamo's frontend:
no NATS, etcd or GPU — file-backed discovery, TCP request plane, ZMQ event plane, all on
127.0.0.1. One ``DistributedRuntime`` + served endpoint per engine_sim stands in for a Dynamo
worker (registered with ``total_kv_blocks`` = the engine's capacity); the router runtime builds
``KvRouter(endpoint, block_size, KvRouterConfig(use_kv_events=False,
router_approximate_cache_policy="lru"))`` — approximate mode, predicting each worker's cache from
its own decisions, LRU retention sized to the engine (its default 120 s wall-clock TTL means
nothing under time compression); everything else default (``prefill_load_scale`` 1, temperature 0).

``POST /v1/completions`` (token-id ``prompt``, ``max_tokens``, ``user``): ``best_worker(tokens,
request_id, update_indexer=True)``, one decision at a time, each waiting until it shows in
``get_overlap_scores`` (the approximate index updates asynchronously); then the request streams to
the chosen engine, ``mark_prefill_complete`` at the first token, ``free`` at the end. Answers
``{"worker", "overlap_blocks"}``. ``GET /health``, ``GET /kvroute/dynamo`` (decision timings).
It runs in its own process so its event loop is not shared with the replay driver's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from kvroute.procs import write_ready_file

_STREAM = b'{"stream":true,'
"""Prefix replacing a request body's opening brace: the same object, streamed."""
_JSON = {"Content-Type": "application/json"}


class DynamoFront:
    """KvRouter + forwarding to engine_sim URLs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.urls: dict[int, str] = {}
        self.kv_router: Any = None
        self.runtimes: list[Any] = []
        self.serving: list[asyncio.Future[Any]] = []
        self.lock = asyncio.Lock()
        self.http: aiohttp.ClientSession | None = None
        self.decision_ms: list[float] = []
        self.index_timeouts = 0

    async def start(self) -> None:
        """Worker runtimes, router runtime, KvRouter; wait until it sees every worker."""
        from dynamo._core import (
            DistributedRuntime,
            KvRouter,
            KvRouterConfig,
            ModelInput,
            ModelRuntimeConfig,
            ModelType,
            WorkerType,
            register_model,
        )

        a = self.a
        path = f"kvb{os.getpid()}.backend.generate"
        loop = asyncio.get_running_loop()

        async def handler(_request: Any) -> Any:  # never called: requests go over HTTP
            yield {"token_ids": []}

        for url in a.engine:
            rt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
            self.runtimes.append(rt)
            ep = rt.endpoint(path)
            cfg = ModelRuntimeConfig()
            cfg.total_kv_blocks = a.total_kv_blocks
            cfg.max_num_seqs = a.max_num_seqs
            await register_model(ModelInput.Tokens, ModelType.Chat, ep, a.model, a.model,
                                 worker_type=WorkerType.Aggregated,
                                 kv_cache_block_size=a.block_size, runtime_config=cfg,
                                 skip_model_assets=True)
            self.serving.append(asyncio.ensure_future(ep.serve_endpoint(handler)))
            self.urls[int(ep.connection_id())] = url
        rrt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
        self.runtimes.append(rrt)
        config = KvRouterConfig(use_kv_events=False, router_approximate_cache_policy="lru")
        self.kv_router = KvRouter(rrt.endpoint(path), a.block_size, config)
        deadline = time.monotonic() + 30.0
        while True:
            loads = await self.kv_router.get_potential_loads([1] * a.block_size)
            if {int(x["worker_id"]) for x in loads} >= set(self.urls):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"dynamo: router sees {len(loads)} of {len(self.urls)} "
                                   "workers after 30 s")
            await asyncio.sleep(0.1)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                          connector=aiohttp.TCPConnector(limit=1024))

    async def stop(self) -> None:
        """Close the client, shut the runtimes down."""
        if self.http is not None:
            await self.http.close()
        for fut in self.serving:
            fut.cancel()
        for rt in self.runtimes:
            with contextlib.suppress(Exception):
                rt.shutdown()
        await asyncio.sleep(0.3)

    async def _wait_indexed(self, tokens: list[int], worker: int) -> None:
        want = len(tokens) // self.a.block_size
        deadline = time.monotonic() + self.a.index_wait_s
        while want and time.monotonic() < deadline:
            scores = await self.kv_router.get_overlap_scores(tokens)
            for w in scores.get("workers", []):
                if int(w["worker_id"]) == worker and int(w["device_blocks"]) >= want:
                    return
            await asyncio.sleep(0.001)
        if want:
            self.index_timeouts += 1

    async def completions(self, request: web.Request) -> web.Response:
        """Route, forward (streaming), answer the decision."""
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)
        tokens = body.get("prompt") if isinstance(body, dict) else None
        rid = str(body.get("user") or "") if isinstance(body, dict) else ""
        if not isinstance(tokens, list) or not tokens or not rid or "stream" in body:
            return web.json_response({"error": "need a token-id prompt and a user id (and no "
                                               "stream field: the front streams)"}, status=400)
        t0 = time.perf_counter()
        async with self.lock:
            worker, _dp, overlap = await self.kv_router.best_worker(
                tokens, request_id=rid, update_indexer=True)
            await self._wait_indexed(tokens, int(worker))
        self.decision_ms.append((time.perf_counter() - t0) * 1000.0)
        url = self.urls[int(worker)]
        assert self.http is not None
        status, error = 200, ""
        try:
            # the client's bytes with "stream": true spliced in — no re-encoding of the tokens
            # on this (single-threaded) event loop, which every decision shares
            async with self.http.post(url + "/v1/completions", data=_STREAM + raw.lstrip()[1:],
                                      headers=_JSON) as resp:
                status = resp.status
                if status != 200:
                    error = (await resp.read())[:300].decode(errors="replace")
                else:
                    while True:  # first SSE event = first token; the rest is read in bulk
                        line = await resp.content.readline()
                        if not line or line.startswith(b"data:"):
                            break
                    await self.kv_router.mark_prefill_complete(rid)
                    await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, error = 502, repr(exc)
        finally:
            with contextlib.suppress(Exception):
                await self.kv_router.free(rid)
        return web.json_response({"worker": int(worker), "overlap_blocks": int(overlap),
                                  "error": error}, status=status)

    async def stats(self, _request: web.Request) -> web.Response:
        """Decision timings (lock wait + best_worker + index wait) and index-wait timeouts."""
        ms = sorted(self.decision_ms) or [0.0]
        return web.json_response({"decisions": len(self.decision_ms),
                                  "decision_ms_p50": ms[len(ms) // 2],
                                  "decision_ms_p90": ms[int(len(ms) * 0.9)],
                                  "index_timeouts": self.index_timeouts})


async def _serve(args: argparse.Namespace) -> None:
    front = DynamoFront(args)
    await front.start()
    app = web.Application(client_max_size=1 << 28)
    app.router.add_post("/v1/completions", front.completions)
    app.router.add_get("/kvroute/dynamo", front.stats)
    app.router.add_get("/health", lambda _r: _ok())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file:
        write_ready_file(args.ready_file, {"http_port": args.port, "pid": os.getpid()})
    await stop.wait()
    await runner.cleanup()
    await front.stop()


async def _ok() -> web.Response:
    return web.json_response({"status": "ok"})


def main(argv: list[str] | None = None) -> int:
    """Parse flags, serve until SIGTERM."""
    p = argparse.ArgumentParser(prog="python -m bench.peers.dynamo_server", description=__doc__)
    p.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    p.add_argument("--engine", action="append", required=True, help="engine_sim base URL")
    p.add_argument("--model", required=True, help="model name the engines serve")
    p.add_argument("--block-size", type=int, required=True, help="KV block size (tokens)")
    p.add_argument("--total-kv-blocks", type=int, required=True, help="engine capacity")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine batch limit")
    p.add_argument("--index-wait-s", type=float, default=0.05,
                   help="longest wait for a decision to show in the approximate index")
    p.add_argument("--ready-file", default="", help="write {http_port, pid} here when up")
    asyncio.run(_serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
