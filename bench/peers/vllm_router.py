"""vllm-router 0.1.17 (vLLM production-stack's Rust router) as a peer.

Token-id prompts go to ``/v1/completions``; the router routes on the ids directly (cache_aware
makes no render calls then). kv_aware subscribes to every engine's ZMQ KV events and replay
socket (map encoding, the streams kvroute's node agents read) with the engines' block size; after
a replay :meth:`VllmRouterPeer.notes` reads its placement-lookup counters to show it indexed
the engines' blocks (it silently falls back to load-only routing otherwise). The body's ``user``
carries the request id to the engine's records. Default settings, except cache_aware's
tree-eviction timer: its 120 wall seconds are scaled by the fleet's time compression
(``--eviction-interval-secs`` 24 at ``time_scale`` 0.2; :func:`scaled_interval_s`). kv_aware
exposes no wall-clock setting that is on by default (session affinity TTL is off).
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from bench.peers.base import SendResult, post_json, scaled_interval_s
from bench.peers.engines import EngineFleet
from bench.peers.process import RouterProcess, find_executable
from bench.prompts import Prompt, json_body
from bench.workloads.base import TraceRequest
from kvroute.procs import free_port

_LOOKUP = re.compile(r'^vllm_router_kv_placement_lookups_total\{[^}]*result="(\w+)"[^}]*\}\s+(\S+)',
                     re.MULTILINE)


def available() -> str | None:
    """``None`` when installed, else why not."""
    if find_executable("vllm-router") is None:
        return "vllm-router is not installed (pip install 'kvroute[peers]')"
    return None


EVICTION_INTERVAL_S = 120
"""vllm-router 0.1.17's ``--eviction-interval-secs`` default (cache_aware's tree eviction)."""


class VllmRouterPeer:
    """One vllm-router process per replay."""

    router = "vllm-router"

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.model = ""
        self.prom_port = 0
        self.eviction_s = EVICTION_INTERVAL_S
        self.proc: RouterProcess | None = None

    async def start(self, fleet: EngineFleet, workdir: Path) -> None:
        """Start the router in front of every engine (and its event streams for kv_aware)."""
        exe = find_executable("vllm-router")
        if exe is None:
            raise RuntimeError(available())
        port, self.prom_port = free_port(), free_port()
        self.model = fleet.spec.model
        argv = [exe, "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", *[e.url for e in fleet.engines], "--policy", self.policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.prom_port)]
        if self.policy == "cache_aware":
            self.eviction_s = scaled_interval_s(EVICTION_INTERVAL_S, fleet.spec.time_scale)
            argv += ["--eviction-interval-secs", str(self.eviction_s)]
        if self.policy == "kv_aware":
            argv += ["--kv-event-block-size", str(fleet.spec.block_size),
                     "--kv-event-model", fleet.spec.model]
            for e in fleet.engines:
                argv += ["--kv-event-source", f"{e.url}={e.events_endpoint}",
                         "--kv-event-replay-source", f"{e.url}={e.replay_endpoint}"]
        self.proc = RouterProcess(f"vllm-router-{self.policy}", argv, port, workdir)
        self.proc.start()

    async def send(self, http: aiohttp.ClientSession, req: TraceRequest, prompt: Prompt,
                   direct_url: str | None = None) -> SendResult:
        """``POST /v1/completions`` with a token-id prompt (or straight to an engine)."""
        assert self.proc is not None, "not started"
        base = direct_url or self.proc.base
        body = json_body({"model": self.model, "max_tokens": max(1, req.output_tokens),
                          "user": req.request_id}, "prompt", prompt)
        return SendResult(error=await post_json(http, base + "/v1/completions", body))

    async def lookups(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """kv_aware placement lookups by result (``hit``/``miss``...) from its /metrics."""
        try:
            async with http.get(f"http://127.0.0.1:{self.prom_port}/metrics") as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return {}
        out: dict[str, float] = {}
        for result, value in _LOOKUP.findall(text):
            out[result] = out.get(result, 0.0) + float(value)
        return out

    async def notes(self, http: aiohttp.ClientSession) -> list[str]:
        """Version, settings and (kv_aware) whether it indexed the engines' events."""
        from importlib.metadata import version

        timer = (f", tree eviction every {self.eviction_s} wall s ({EVICTION_INTERVAL_S} s "
                 "scaled by the time compression)" if self.policy == "cache_aware" else "")
        notes = [f"vllm-router {version('vllm-router')} --policy {self.policy} (defaults"
                 f"{timer}); token-id prompts on /v1/completions"]
        if self.policy == "kv_aware":
            found = await self.lookups(http)
            notes.append("kv_aware placement lookups: " + (", ".join(
                f"{k} {v:.0f}" for k, v in sorted(found.items())) or
                "none reported (events not indexed?)"))
        return notes

    async def stop(self) -> None:
        """Stop the router process."""
        if self.proc is not None:
            self.proc.stop()
