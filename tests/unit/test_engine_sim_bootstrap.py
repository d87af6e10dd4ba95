"""An SGLang prefill half aborted by its client: the engine request is aborted once, its blocks
freed, and its bootstrap room failed once, with a reason the decode side can show.

engine_sim is served by :func:`engine_sim.server.serve` on a loopback port (as in
tests/unit/test_engine_sim_disconnect.py), so the abort on disconnect is the server's own
runner's doing, not aiohttp TestServer's (which cancels handlers on disconnect by itself)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine_sim.bootstrap import BootstrapRooms
from tests.engine_sim_server import served
from tests.engine_sim_server import stats as _stats


def _engine(tmp_path: Path, max_running: int) -> AbstractAsyncContextManager[str]:
    """A real slow prefill engine_sim server (20 prompt tokens/s) on a loopback port."""
    return served(tmp_path, capacity_blocks=64, block_size=4, max_running=max_running,
                  role="prefill", prefill_tokens_per_s=20.0)


async def _until(http: aiohttp.ClientSession, base: str,
                 ok: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while not ok(st := await _stats(http, base)):
        assert time.monotonic() < deadline, f"{what}: {st}"
        await asyncio.sleep(0.05)
    return st


async def _abort_prefill(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, max_running: int,
                         ) -> tuple[dict[str, Any], dict[str, Any], list[int]]:
    """Send a prefill half (room 3) to a slow prefill engine, abort it once it is running
    (``max_running`` 4) or queued behind a busy slot (1); the engine's stats at the end, the
    room's state, and the rooms each ``BootstrapRooms.fail`` call was for."""
    fails: list[int] = []
    real_fail = BootstrapRooms.fail

    def fail(self: BootstrapRooms, room: int, message: str) -> None:
        fails.append(room)
        real_fail(self, room, message)

    monkeypatch.setattr(BootstrapRooms, "fail", fail)
    async with _engine(tmp_path, max_running) as base, aiohttp.ClientSession() as http:
        async def generate(body: dict[str, Any]) -> bytes:
            async with http.post(f"{base}/generate", json=body) as resp:
                return await resp.read()

        port = int(base.rsplit(":", 1)[1])
        # max_running 0 would be invalid: a long first request keeps the slot busy instead
        if max_running == 1:
            busy = asyncio.ensure_future(generate({
                "input_ids": list(range(100, 140)), "stream": True,
                "sampling_params": {"max_new_tokens": 1}}))
            await _until(http, base, lambda s: s["num_running"] == 1, "busy never admitted")
        body = {"input_ids": list(range(40)), "sampling_params": {"max_new_tokens": 5},
                "bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": 3}
        half = asyncio.ensure_future(generate(body))
        if max_running == 1:  # the half is queued behind the busy one, not running
            st = await _until(http, base, lambda s: s["num_waiting"] == 1, "never queued")
            assert st["num_running"] == 1
        else:  # the half is running, mid-prefill (40 tokens at 20/s: 2 s)
            st = await _until(http, base, lambda s: s["num_running"] == 1, "never admitted")
            assert st["used_blocks"] > 0
        half.cancel()  # the client goes away: the connection closes
        with pytest.raises(asyncio.CancelledError):
            await half
        await _until(http, base, lambda s: s["requests_aborted"] >= 1, "half not aborted")
        async with http.get(f"{base}/kvroute/bootstrap/rooms/3") as resp:
            room = await resp.json()
        if max_running == 1:
            busy.cancel()
            with pytest.raises(asyncio.CancelledError):
                await busy
            await _until(http, base, lambda s: s["requests_aborted"] >= 2, "busy not aborted")
        stats = await _stats(http, base)
    return stats, room, fails


async def test_a_prefill_half_aborted_mid_prefill_fails_its_room_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stats, room, fails = await _abort_prefill(monkeypatch, tmp_path, max_running=4)
    assert room["status"] == "failed" and "aborted" in room["message"]
    assert fails == [3]
    assert stats["requests_aborted"] == 1
    assert stats["used_blocks"] == 0 and stats["num_running"] == 0


async def test_a_prefill_half_aborted_in_the_queue_fails_its_room_once_saying_so(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stats, room, fails = await _abort_prefill(monkeypatch, tmp_path, max_running=1)
    assert room["status"] == "failed" and "aborted" in room["message"]
    assert fails == [3]
    assert stats["num_waiting"] == 0 and stats["used_blocks"] == 0
    assert stats["requests_aborted"] == 2  # the half in the queue, the busy one
