"""engine_sim served in-process by its own runner (:func:`engine_sim.server.serve`) on loopback
ports, for tests that depend on the real server's settings (aiohttp's TestServer cancels handlers
on a client disconnect by itself; engine_sim's runner must do so on its own)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from engine_sim.server import serve
from engine_sim.settings import EngineSimSettings


@asynccontextmanager
async def served(tmp_path: Path, **settings: Any) -> AsyncIterator[str]:
    """Serve engine_sim with ``settings`` (EngineSimSettings fields) on loopback; yields its base
    URL and stops it (drained) on exit."""
    ready = tmp_path / "ready.json"
    cfg = EngineSimSettings(
        listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", ready_file=str(ready),
        events_endpoint="", replay_endpoint="", time_scale=1.0, drain_timeout_s=1.0, **settings)
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(cfg, stop))
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert not task.done(), task.exception() if task.done() else ""
            assert time.monotonic() < deadline, "engine_sim did not start"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{json.loads(ready.read_text())['http_port']}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def stats(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """The server's ``/kvroute/stats`` without per-request records."""
    async with http.get(f"{base}/kvroute/stats", params={"records": "0"}) as resp:
        out: dict[str, Any] = await resp.json()
        return out
