"""NVIDIA Dynamo's KvRouter (``ai-dynamo-runtime`` 1.6) as a peer.

Dynamo ships a router library, not a router binary: :mod:`bench.peers.dynamo_server` wraps its
``KvRouter`` (approximate mode, LRU retention with ``total_kv_blocks`` = engine capacity, other
settings default) in a small HTTP front that forwards to the chosen engine_sim — its own process
on loopback, started and stopped by pid like the other peers, so its event loop (streaming every
request to catch the first token for ``mark_prefill_complete``) is not shared with the replay
driver. Discovery is a file directory, request plane TCP, event plane ZMQ, all on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import aiohttp

from bench.peers.base import SendResult, post_json
from bench.peers.engines import EngineFleet
from bench.peers.process import RouterProcess
from bench.prompts import JSON_HEADERS, Prompt, json_body
from bench.workloads.base import TraceRequest
from kvroute.procs import free_port


def available() -> str | None:
    """``None`` when installed, else why not."""
    if importlib.util.find_spec("dynamo") is None:
        return "ai-dynamo-runtime is not installed (pip install 'kvroute[peers]')"
    return None


class DynamoPeer:
    """One ``bench.peers.dynamo_server`` process per replay."""

    router = "dynamo"

    def __init__(self, policy: str = "kv") -> None:
        self.policy = policy
        self.model = ""
        self.block_size = 16
        self.proc: RouterProcess | None = None

    async def start(self, fleet: EngineFleet, workdir: Path) -> None:
        """Start the Dynamo front in front of every engine of ``fleet``."""
        spec = fleet.spec
        self.model, self.block_size = spec.model, spec.block_size
        port = free_port()
        argv = [sys.executable, "-m", "bench.peers.dynamo_server", "--port", str(port),
                "--model", spec.model, "--block-size", str(spec.block_size),
                "--total-kv-blocks", str(spec.cache_blocks),
                "--max-num-seqs", str(spec.max_running)]
        for e in fleet.engines:
            argv += ["--engine", e.url]
        discovery = workdir / "dynamo-discovery"
        discovery.mkdir(parents=True, exist_ok=True)
        env = {"DYN_FILE_KV": str(discovery), "DYN_TCP_RPC_HOST": "127.0.0.1",
               "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
               "DYN_LOG": "warn"}
        self.proc = RouterProcess("dynamo-kv", argv, port, workdir, env=env)
        self.proc.start()

    async def send(self, http: aiohttp.ClientSession, req: TraceRequest, prompt: Prompt,
                   direct_url: str | None = None) -> SendResult:
        """Through the Dynamo front (or the same body straight to an engine)."""
        assert self.proc is not None, "not started"
        body = json_body({"model": self.model, "max_tokens": max(1, req.output_tokens),
                          "user": req.request_id}, "prompt", prompt)
        if direct_url is not None:
            return SendResult(error=await post_json(http, direct_url + "/v1/completions", body))
        try:
            async with http.post(self.proc.base + "/v1/completions", data=body,
                                 headers=JSON_HEADERS) as resp:
                data = await resp.json()
                if resp.status != 200:
                    return SendResult(error=f"dynamo {resp.status}: {data.get('error', data)}")
                return SendResult(predicted_cached_tokens=int(data["overlap_blocks"])
                                  * self.block_size)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            return SendResult(error=f"dynamo: {exc!r}")

    async def notes(self, http: aiohttp.ClientSession) -> list[str]:
        """Version, settings, and the front's decision timings."""
        from importlib.metadata import version

        assert self.proc is not None
        notes = [f"ai-dynamo-runtime {version('ai-dynamo-runtime')} KvRouter approximate mode "
                 "(use_kv_events=False), LRU retention, total_kv_blocks = engine capacity, "
                 "other settings default"]
        try:
            async with http.get(self.proc.base + "/kvroute/dynamo") as resp:
                st = await resp.json()
            notes.append(f"decision wall time (lock wait + best_worker + index wait): median "
                         f"{st['decision_ms_p50']:.2f} ms, p90 {st['decision_ms_p90']:.2f} ms; "
                         f"index updates not visible within 50 ms: {st['index_timeouts']}")
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            notes.append(f"dynamo front stats unavailable: {exc!r}")
        return notes

    async def stop(self) -> None:
        """Stop the front process."""
        if self.proc is not None:
            self.proc.stop()
