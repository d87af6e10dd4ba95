"""NVIDIA Dynamo's KvRouter (``ai-dynamo-runtime`` 1.6) driven in-process as a peer.

No NATS, etcd or GPU: a file-backed discovery directory, the TCP request plane and the ZMQ event
plane, all on 127.0.0.1. One ``DistributedRuntime`` and served endpoint per engine_sim stands in
for a Dynamo worker (registered with ``total_kv_blocks`` = the engine's capacity); the router's
runtime builds ``KvRouter(endpoint, block_size, KvRouterConfig(use_kv_events=False,
router_approximate_cache_policy="lru"))`` — approximate mode, predicting each worker's cache from
its own decisions, with LRU retention sized to the engine (its default 120 s wall-clock TTL means
nothing under time compression). Everything else is Dynamo's default (``prefill_load_scale`` 1,
temperature 0).

Per request: ``best_worker(tokens, request_id, update_indexer=True)`` (decisions one at a time;
the approximate index is updated asynchronously, so the replay waits until the decision shows in
``get_overlap_scores`` before the next one), then the request streams to the chosen engine_sim;
``mark_prefill_complete`` at the first token and ``free`` at the end keep Dynamo's load view
(queued prefill tokens, active blocks) what it would be in front of real workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.peers.base import HUB_GUARD, SendResult
from bench.peers.engines import EngineFleet
from bench.workloads.base import TraceRequest

_ENV = ("DYN_FILE_KV", "DYN_TCP_RPC_HOST", "DYN_EVENT_PLANE_HOST",
        "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_LOG", "HF_ENDPOINT")


def available() -> str | None:
    """``None`` when installed, else why not."""
    if importlib.util.find_spec("dynamo") is None:
        return "ai-dynamo-runtime is not installed (pip install 'kvroute[peers]')"
    return None


class DynamoPeer:
    """Dynamo KvRouter in this process, forwarding to the chosen engine_sim."""

    router = "dynamo"

    def __init__(self, policy: str = "kv", index_wait_s: float = 0.05) -> None:
        self.policy = policy
        self.index_wait_s = index_wait_s
        self.model = ""
        self.block_size = 16
        self.urls: dict[int, str] = {}
        self.kv_router: Any = None
        self._runtimes: list[Any] = []
        self._serving: list[asyncio.Future[Any]] = []
        self._saved_env: dict[str, str | None] = {}
        self._lock = asyncio.Lock()
        self.index_timeouts = 0

    async def start(self, fleet: EngineFleet, workdir: Path) -> None:
        """One runtime + endpoint per engine, then the router; wait until it sees them all."""
        kv_dir = workdir / "dynamo-discovery"
        kv_dir.mkdir(parents=True, exist_ok=True)
        self._saved_env = {k: os.environ.get(k) for k in _ENV}
        os.environ.update(DYN_FILE_KV=str(kv_dir), DYN_TCP_RPC_HOST="127.0.0.1",
                          DYN_EVENT_PLANE_HOST="127.0.0.1",
                          DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1",
                          DYN_LOG=os.environ.get("DYN_LOG", "error"), HF_ENDPOINT=HUB_GUARD)
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

        spec = fleet.spec
        self.model, self.block_size = spec.model, spec.block_size
        path = f"kvb{os.getpid()}.backend.generate"
        loop = asyncio.get_running_loop()

        async def handler(_request: Any) -> Any:  # never called: requests go over HTTP
            yield {"token_ids": []}

        for engine in fleet.engines:
            rt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
            self._runtimes.append(rt)
            ep = rt.endpoint(path)
            cfg = ModelRuntimeConfig()
            cfg.total_kv_blocks = spec.cache_blocks
            cfg.max_num_seqs = spec.max_running
            await register_model(ModelInput.Tokens, ModelType.Chat, ep, spec.model, spec.model,
                                 worker_type=WorkerType.Aggregated,
                                 kv_cache_block_size=spec.block_size, runtime_config=cfg,
                                 skip_model_assets=True)
            self._serving.append(asyncio.ensure_future(ep.serve_endpoint(handler)))
            self.urls[int(ep.connection_id())] = engine.url
        rrt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
        self._runtimes.append(rrt)
        config = KvRouterConfig(use_kv_events=False, router_approximate_cache_policy="lru")
        self.kv_router = KvRouter(rrt.endpoint(path), spec.block_size, config)
        deadline = time.monotonic() + 30.0
        while True:
            loads = await self.kv_router.get_potential_loads([1] * spec.block_size)
            if {int(x["worker_id"]) for x in loads} >= set(self.urls):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"dynamo: router sees {len(loads)} of {len(self.urls)} "
                                   "workers after 30 s")
            await asyncio.sleep(0.1)

    async def _wait_indexed(self, tokens: list[int], worker: int) -> None:
        """Until the approximate index shows the decision (or ``index_wait_s`` passed)."""
        want = len(tokens) // self.block_size
        if want == 0:
            return
        deadline = time.monotonic() + self.index_wait_s
        while time.monotonic() < deadline:
            scores = await self.kv_router.get_overlap_scores(tokens)
            for w in scores.get("workers", []):
                if int(w["worker_id"]) == worker and int(w["device_blocks"]) >= want:
                    return
            await asyncio.sleep(0.001)
        self.index_timeouts += 1

    async def send(self, http: aiohttp.ClientSession, req: TraceRequest, tokens: list[int],
                   direct_url: str | None = None) -> SendResult:
        """Route with ``best_worker`` and stream the request to that engine."""
        rid = req.request_id
        predicted = 0
        if direct_url is None:
            try:
                async with self._lock:
                    worker, _dp, overlap = await self.kv_router.best_worker(
                        tokens, request_id=rid, update_indexer=True)
                    await self._wait_indexed(tokens, int(worker))
            except Exception as exc:  # any router failure becomes this request's error
                return SendResult(error=f"dynamo best_worker: {exc!r}")
            url = self.urls.get(int(worker))
            if url is None:
                return SendResult(error=f"dynamo chose unknown worker {worker}")
            predicted = int(overlap) * self.block_size
        else:
            url = direct_url
        body = {"model": self.model, "prompt": tokens, "max_tokens": max(1, req.output_tokens),
                "user": rid, "stream": True}
        error = ""
        first = True
        try:
            async with http.post(url + "/v1/completions", json=body) as resp:
                if resp.status != 200:
                    error = f"engine {resp.status}: {(await resp.read())[:200]!r}"
                else:
                    async for line in resp.content:
                        if first and line.startswith(b"data:") and direct_url is None:
                            first = False
                            await self.kv_router.mark_prefill_complete(rid)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"engine: {exc!r}"
        finally:
            if direct_url is None:
                with contextlib.suppress(Exception):
                    await self.kv_router.free(rid)
        return SendResult(error=error, predicted_cached_tokens=predicted)

    async def notes(self, http: aiohttp.ClientSession) -> list[str]:
        """Version, settings, and how often the index update did not land in time."""
        from importlib.metadata import version

        return [f"ai-dynamo-runtime {version('ai-dynamo-runtime')} KvRouter approximate mode "
                "(use_kv_events=False), LRU retention, total_kv_blocks = engine capacity, "
                "other settings default",
                f"index updates not visible within {self.index_wait_s * 1000:.0f} ms: "
                f"{self.index_timeouts}"]

    async def stop(self) -> None:
        """Shut every runtime down and restore the environment."""
        for fut in self._serving:
            fut.cancel()
        for rt in self._runtimes:
            with contextlib.suppress(Exception):
                rt.shutdown()
        if self._runtimes:
            await asyncio.sleep(0.3)  # let the runtimes' callbacks drain before the loop ends
        self._serving.clear()
        self._runtimes.clear()
        self.kv_router = None
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}
