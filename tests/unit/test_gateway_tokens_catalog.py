"""Engine tokenization (cache, sharing, failover, errors) and the model catalog (LoRA adapters
learnt from the engines' /v1/models), against real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvroute.procs import free_port
from router_service.model_catalog import ModelCatalog
from router_service.openai_request import OpenAIError, parse
from router_service.placement import NodeState
from router_service.prompt_tokens import EngineTokenizer, PromptTokens, TokenCache


class FakeEngine:
    """/tokenize (ids = character codes, after a delay) and /v1/models with adapters."""

    def __init__(self, adapters: list[str]) -> None:
        self.calls = 0
        self.adapters = adapters
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def tokenize(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.json()
        await asyncio.sleep(0.05)
        if body.get("prompt") == "bad":
            return web.json_response({"error": {"message": "no such thing"}}, status=400)
        text = body.get("prompt") or "".join(m["content"] for m in body["messages"])
        return web.json_response({"tokens": [ord(c) for c in text], "count": len(text)})

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": "base", "object": "model", "parent": None}]
        data += [{"id": a, "object": "model", "parent": "base", "root": f"/loras/{a}"}
                 for a in self.adapters]
        return web.json_response({"object": "list", "data": data})

    async def start(self) -> FakeEngine:
        app = web.Application()
        app.add_routes([web.post("/tokenize", self.tokenize), web.get("/v1/models", self.models)])
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def engines() -> AsyncIterator[tuple[FakeEngine, FakeEngine, aiohttp.ClientSession]]:
    a, b = await FakeEngine(["ad-1"]).start(), await FakeEngine(["ad-1", "ad-2"]).start()
    session = aiohttp.ClientSession()
    try:
        yield a, b, session
    finally:
        await session.close()
        await a.stop()
        await b.stop()


async def test_engine_tokenization_cache_sharing_failover(
        engines: tuple[FakeEngine, FakeEngine, aiohttp.ClientSession]) -> None:
    a, b, session = engines
    tokens = PromptTokens({}, EngineTokenizer(session, timeout_s=2), TokenCache(100))
    ids_req = parse("completions", {"prompt": [1, 2]})
    assert list(await tokens.token_ids(ids_req, "base", lambda: [])) == [1, 2]
    chat = parse("chat", {"model": "base", "messages": [{"role": "user", "content": "hey"}]})
    got = await asyncio.gather(*(tokens.token_ids(chat, "base", lambda: [a.address])
                                 for _ in range(5)))
    assert got == [[104, 101, 121]] * 5
    assert a.calls == 1  # five identical bodies at once: one engine call
    same = parse("chat", {"model": "base", "temperature": 1.0,
                          "messages": [{"role": "user", "content": "hey"}]})
    assert await tokens.token_ids(same, "base", lambda: [a.address]) == [104, 101, 121]
    assert a.calls == 1  # cached per body
    dead = f"127.0.0.1:{free_port()}"
    text = parse("completions", {"prompt": "ok"})
    assert await tokens.token_ids(text, "base", lambda: [dead, b.address]) == [111, 107]
    assert tokens.by_source == {"ids": 1, "local": 0, "cache": 5, "engine": 2}
    with pytest.raises(OpenAIError) as info:
        await tokens.token_ids(parse("completions", {"prompt": "bad"}), "base", lambda: [a.address])
    assert info.value.status == 400 and "no such thing" in info.value.message
    with pytest.raises(OpenAIError) as info:
        await tokens.token_ids(parse("completions", {"prompt": "zz"}), "base", lambda: [dead])
    assert info.value.status == 503
    with pytest.raises(OpenAIError) as info:
        await PromptTokens({}, None, TokenCache(1)).token_ids(text, "base", lambda: [a.address])
    assert info.value.status == 400


def test_token_cache_is_lru() -> None:
    c = TokenCache(2)
    c.put(b"a", [1])
    c.put(b"b", [2])
    assert c.get(b"a") == [1]
    c.put(b"c", [3])
    assert c.get(b"b") is None and c.get(b"a") == [1] and len(c) == 2


async def test_catalog_learns_adapters_from_engines(
        engines: tuple[FakeEngine, FakeEngine, aiohttp.ClientSession]) -> None:
    a, b, session = engines
    nodes = [NodeState("n-a", f"http://{a.address}", "base"),
             NodeState("n-b", b.address, "base"),
             NodeState("n-x", "127.0.0.1:1", "other", healthy=False)]
    cat = ModelCatalog(lambda: nodes, session, refresh_s=60, min_refresh_s=0.0)
    assert (await cat.resolve("base")).lora_name is None
    assert (await cat.resolve("")).model == ""
    r = await cat.resolve("ad-2")  # unknown at first: one early refresh finds it
    assert (r.model, r.lora_name, r.allowed) == ("base", "ad-2", frozenset({"n-b"}))
    r1 = await cat.resolve("ad-1")
    assert r1.allowed == frozenset({"n-a", "n-b"})
    with pytest.raises(OpenAIError) as info:
        await cat.resolve("nope")
    assert info.value.status == 404 and info.value.param == "model"
    listing: list[dict[str, Any]] = cat.listing()
    assert [(m["id"], m["parent"]) for m in listing] == [
        ("base", None), ("ad-1", "base"), ("ad-2", "base")]
    # an adapter unloaded from one engine leaves that node's allowed set on the next refresh
    b.adapters = ["ad-1"]
    await cat.refresh()
    with pytest.raises(OpenAIError):
        await cat.resolve("ad-2")
    empty = ModelCatalog(list, session)
    with pytest.raises(OpenAIError) as info:
        await empty.resolve("x")
    assert info.value.status == 503
