"""An SGLang prefill half aborted by its client (engine_sim's HTTP server on a loopback port):
the engine request is aborted once, its blocks freed, and its bootstrap room failed once, with a
reason the decode side can show."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from engine_sim.bootstrap import BootstrapRooms
from engine_sim.engine import SimEngine
from engine_sim.http_api import make_app
from engine_sim.settings import EngineSimSettings


async def _abort_prefill(monkeypatch: pytest.MonkeyPatch, max_running: int,
                         ) -> tuple[SimEngine, dict[str, Any], list[int]]:
    """Send a prefill half (room 3) to a slow prefill engine, abort it 0.3 s in; the engine,
    the room's state, and the rooms each ``BootstrapRooms.fail`` call was for."""
    fails: list[int] = []
    real_fail = BootstrapRooms.fail

    def fail(self: BootstrapRooms, room: int, message: str) -> None:
        fails.append(room)
        real_fail(self, room, message)

    monkeypatch.setattr(BootstrapRooms, "fail", fail)
    eng = SimEngine(EngineSimSettings(
        events_endpoint="", replay_endpoint="", time_scale=1.0, capacity_blocks=64,
        block_size=4, max_running=max_running, role="prefill", prefill_tokens_per_s=20.0))
    await eng.start()
    srv = TestServer(make_app(eng, CollectorRegistry()), host="127.0.0.1")
    await srv.start_server()
    base = f"http://127.0.0.1:{srv.port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def generate(body: dict[str, Any]) -> bytes:
                async with http.post(f"{base}/generate", json=body) as resp:
                    return await resp.read()

            # max_running 0 would be invalid: a long first request keeps the slot busy instead
            if max_running == 1:
                busy = asyncio.ensure_future(generate({
                    "input_ids": list(range(100, 140)), "stream": True,
                    "sampling_params": {"max_new_tokens": 1}}))
                await asyncio.sleep(0.1)
            body = {"input_ids": list(range(40)), "sampling_params": {"max_new_tokens": 5},
                    "bootstrap_host": "127.0.0.1", "bootstrap_port": srv.port,
                    "bootstrap_room": 3}
            half = asyncio.ensure_future(generate(body))
            await asyncio.sleep(0.3)
            half.cancel()  # the client goes away: the connection closes
            with pytest.raises(asyncio.CancelledError):
                await half
            await asyncio.sleep(0.3)
            async with http.get(f"{base}/kvroute/bootstrap/rooms/3") as resp:
                room = await resp.json()
            if max_running == 1:
                busy.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await busy
                await asyncio.sleep(0.1)
    finally:
        await srv.close()
        await eng.stop()
    return eng, room, fails


async def test_a_prefill_half_aborted_mid_prefill_fails_its_room_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    eng, room, fails = await _abort_prefill(monkeypatch, max_running=4)
    assert room["status"] == "failed" and "aborted" in room["message"]
    assert fails == [3]
    assert eng.stats()["requests_aborted"] == 1
    assert eng.cache.used_blocks == 0 and eng.model.num_running == 0


async def test_a_prefill_half_aborted_in_the_queue_fails_its_room_once_saying_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    eng, room, fails = await _abort_prefill(monkeypatch, max_running=1)
    assert room["status"] == "failed" and "aborted" in room["message"]
    assert fails == [3]
    assert eng.model.num_waiting == 0 and eng.cache.used_blocks == 0
    assert eng.stats()["requests_aborted"] == 2  # the half in the queue, the busy one
