"""The gateway's upstream HTTP client against a real aiohttp server on loopback: keep-alive
reuse, an idle connection the server closed, chunked streams, Connection: close, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from kvroute.procs import free_port
from router_service.gateway.upstream import (
    ConnectFailed,
    ResponseBroken,
    Target,
    Upstream,
)


class Server:
    def __init__(self) -> None:
        self.peers: set[object] = set()
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    async def echo(self, request: web.Request) -> web.Response:
        self.peers.add(request.transport)
        body = await request.read()
        return web.Response(body=b"echo:" + body, headers={"X-Seen": request.headers["X-A"]},
                            content_type="application/json")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b"data: %d\n\n" % i)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async def close(self, request: web.Request) -> web.Response:
        return web.Response(body=b"bye", headers={"Connection": "close"})

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(body=b"late")

    async def cut(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"partial")
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def start(self) -> Server:
        app = web.Application()
        app.add_routes([web.post("/echo", self.echo), web.post("/stream", self.stream),
                        web.post("/close", self.close), web.post("/slow", self.slow),
                        web.post("/cut", self.cut)])
        # a long keep-alive: the test closes idle connections itself, when it means to (with
        # 0.3 s, a loaded machine's pause between two requests closed one: two connections)
        self.runner = web.AppRunner(app, keepalive_timeout=30)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = await Server().start()
    try:
        yield s
    finally:
        await s.stop()


async def test_keep_alive_reuse_and_idle_close(server: Server) -> None:
    up = Upstream(connect_timeout_s=1, read_timeout_s=1)
    target = Target.parse(f"http://127.0.0.1:{server.port}", False)
    for i in range(3):
        r = await up.post(target, "/echo", {"X-A": str(i)}, b"body%d" % i)
        assert (r.status, await r.read()) == (200, b"echo:body%d" % i)
        assert ("X-Seen", str(i)) in r.headers and r.content_type == "application/json"
        r.release()
    assert len(server.peers) == 1  # one connection served all three
    for transport in server.peers:  # the server closes the idle keep-alive connection
        transport.close()  # type: ignore[attr-defined]
    await asyncio.sleep(1.0)  # the client's side sees it closed (roomy: a loaded machine)
    r = await up.post(target, "/echo", {"X-A": "x"}, b"again")
    assert await r.read() == b"echo:again"
    assert len(server.peers) == 2  # on a new connection
    r.release()
    r = await up.post(target, "/close", {}, b"")
    assert await r.read() == b"bye" and not r.keep_alive
    r.release()
    up.close()


async def test_stream_chunks_and_errors(server: Server) -> None:
    up = Upstream(connect_timeout_s=1, read_timeout_s=0.5)
    target = Target.parse(f"127.0.0.1:{server.port}", False)
    r = await up.post(target, "/stream", {}, b"{}")
    assert r.content_type == "text/event-stream"
    assert b"".join([c async for c in r.iter_chunks()]) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    r.release()
    with pytest.raises(TimeoutError):
        await up.post(target, "/slow", {}, b"")
    r = await up.post(target, "/cut", {}, b"")
    with pytest.raises(ResponseBroken):
        await r.read()
    r.close()
    with pytest.raises(ConnectFailed):
        await up.post(Target.parse(f"127.0.0.1:{free_port()}", False), "/echo", {}, b"")
    with pytest.raises(ValueError):
        Target.parse("no-port", False)
    assert Target.parse("https://h:443/x", False) == Target("h", 443, True)
    up.close()
