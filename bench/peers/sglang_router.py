"""sglang-router 0.3.x (``python -m sglang_router.launch_router``) as a peer.

Token-id prompts go to its SGLang-native ``/generate`` with ``input_ids`` (its
``/v1/completions`` answers 422 to token ids); cache_aware then matches the decimal text of the
ids, so prompts sharing a token prefix share a character prefix. ``rid`` carries the request id
to the engine's records. Default policy settings (cache threshold 0.3, balance thresholds 64 and
1.5), except the tree-eviction timer: its 60 wall seconds are scaled by the fleet's time
compression (``--eviction-interval-secs`` 12 at ``time_scale`` 0.2; :func:`scaled_interval_s`),
the rate per trace second it would run at real speed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import aiohttp

from bench.peers.base import SendResult, post_json, scaled_interval_s
from bench.peers.engines import EngineFleet
from bench.peers.process import RouterProcess
from bench.prompts import Prompt, json_body
from bench.workloads.base import TraceRequest
from kvroute.procs import free_port


def available() -> str | None:
    """``None`` when installed, else why not."""
    if importlib.util.find_spec("sglang_router") is None:
        return "sglang-router is not installed (pip install 'kvroute[peers]')"
    return None


EVICTION_INTERVAL_S = 60
"""sglang-router 0.3.2's ``--eviction-interval-secs`` default (cache_aware's tree eviction)."""


class SglangRouterPeer:
    """One sglang-router process per replay."""

    router = "sglang-router"

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.model = ""
        self.eviction_s = EVICTION_INTERVAL_S
        self.proc: RouterProcess | None = None

    async def start(self, fleet: EngineFleet, workdir: Path) -> None:
        """Start the router in front of every engine of ``fleet``."""
        port = free_port()
        self.model = fleet.spec.model
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                "--port", str(port), "--worker-urls", *[e.url for e in fleet.engines],
                "--policy", self.policy, "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(free_port()), "--log-level", "warn"]
        if self.policy == "cache_aware":
            self.eviction_s = scaled_interval_s(EVICTION_INTERVAL_S, fleet.spec.time_scale)
            argv += ["--eviction-interval-secs", str(self.eviction_s)]
        self.proc = RouterProcess(f"sglang-router-{self.policy}", argv, port, workdir)
        self.proc.start()

    async def send(self, http: aiohttp.ClientSession, req: TraceRequest, prompt: Prompt,
                   direct_url: str | None = None) -> SendResult:
        """``POST /generate`` with ``input_ids`` through the router (or straight to an engine)."""
        assert self.proc is not None, "not started"
        base = direct_url or self.proc.base
        body = json_body({"model": self.model, "rid": req.request_id,
                          "sampling_params": {"max_new_tokens": max(1, req.output_tokens)}},
                         "input_ids", prompt)
        return SendResult(error=await post_json(http, base + "/generate", body))

    async def notes(self, http: aiohttp.ClientSession) -> list[str]:
        """Version and settings."""
        from importlib.metadata import version

        timer = (f", tree eviction every {self.eviction_s} wall s ({EVICTION_INTERVAL_S} s "
                 "scaled by the time compression)" if self.policy == "cache_aware" else "")
        return [f"sglang-router {version('sglang-router')} --policy {self.policy} (defaults"
                f"{timer}); token ids via /generate input_ids"]

    async def stop(self) -> None:
        """Stop the router process."""
        if self.proc is not None:
            self.proc.stop()
