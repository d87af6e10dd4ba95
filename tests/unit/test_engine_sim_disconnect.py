"""A client that goes away from a non-streaming request aborts it in the engine (its KV blocks
freed at once), as the streaming paths do and as vLLM's OpenAI server does (its routes are
``with_cancellation``: a disconnect cancels the handler, and the cancelled generate aborts the
engine request). engine_sim is served by :func:`engine_sim.server.serve` on a loopback port, so
the server's own runner settings are what is tested (aiohttp's TestServer cancels handlers on
disconnect by itself; engine_sim's runner did not)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.engine_sim_server import served
from tests.engine_sim_server import stats as _stats

PROMPT = list(range(1, 41))  # 10 blocks of 4 tokens
BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": PROMPT, "max_tokens": 40},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "a b c d e f g h"}],
                             "max_tokens": 40},
    "/generate": {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 40}},
}


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[str]:
    """A real engine_sim server on a loopback port whose requests decode for ~8 s (wall)."""
    async with served(tmp_path, block_size=4, capacity_blocks=64,
                      decode_ms_per_token=200.0) as base:
        yield base


@pytest.mark.parametrize("path", sorted(BODIES))
async def test_a_client_gone_from_a_non_streaming_request_aborts_it(engine: str,
                                                                     path: str) -> None:
    async with aiohttp.ClientSession() as http:
        async def call() -> bytes:
            async with http.post(f"{engine}{path}", json=BODIES[path]) as resp:
                return await resp.read()

        pending = asyncio.ensure_future(call())
        deadline = time.monotonic() + 10
        while (await _stats(http, engine))["num_running"] != 1:  # admitted: holds its blocks
            assert time.monotonic() < deadline, "the request was never admitted"
            await asyncio.sleep(0.05)
        assert (await _stats(http, engine))["used_blocks"] > 0
        pending.cancel()  # the client goes away: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await pending
        # the request had ~8 s of decoding left; the abort frees it long before that
        deadline = time.monotonic() + 4
        while (st := await _stats(http, engine))["requests_aborted"] < 1:
            assert time.monotonic() < deadline, f"not aborted: {st}"
            await asyncio.sleep(0.05)
        assert st["requests_aborted"] == 1 and st["requests_finished"] == 0
        assert st["num_running"] == 0 and st["used_blocks"] == 0


async def test_a_non_streaming_request_whose_client_stays_finishes(engine: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{engine}/v1/completions",
                             json={"prompt": PROMPT, "max_tokens": 2}) as resp:
            body = await resp.json()
        assert resp.status == 200 and body["usage"]["completion_tokens"] == 2
        st = await _stats(http, engine)
        assert st["requests_aborted"] == 0 and st["requests_finished"] == 1


@pytest.mark.parametrize("path", sorted(BODIES))
async def test_a_stream_failing_at_its_start_aborts_the_request(
        engine: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The abort covers the stream's start too (its headers going out to a client already
    gone), whatever aiohttp does there."""
    from engine_sim.http_api import Api

    async def gone(self: Api, request: Any) -> Any:
        raise ConnectionResetError("client gone before the stream's headers")

    monkeypatch.setattr(Api, "sse_start", gone)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.post(f"{engine}{path}", json=dict(BODIES[path], stream=True)) as r:
                await r.read()
                r.raise_for_status()
        deadline = time.monotonic() + 4
        while (st := await _stats(http, engine))["requests_aborted"] < 1:
            assert time.monotonic() < deadline, f"not aborted: {st}"
            await asyncio.sleep(0.05)
        assert st["num_running"] == 0 and st["used_blocks"] == 0
