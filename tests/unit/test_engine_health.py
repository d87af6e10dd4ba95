"""Engine liveness decisions of the node agent: a refused connection is down at once, timeouts
and HTTP errors after N in a row, the first good check is up again; and the real check against
a live and a dead HTTP endpoint."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from kvroute.procs import free_port
from node_agent.engine_health import EngineHealth


def monitor(failures: int = 2) -> tuple[EngineHealth, list[str]]:
    log: list[str] = []
    h = EngineHealth("http://127.0.0.1:1/health", 0.5, failures, lambda: 0.1,
                     lambda why, gone: log.append(f"down gone={gone}"),
                     lambda: log.append("up"))
    return h, log


def test_transitions() -> None:
    h, log = monitor()
    h.observe(True, False, "")
    h.observe(False, False, "timeout")  # one slow answer: still up
    h.observe(True, False, "")
    h.observe(False, False, "timeout")
    h.observe(False, False, "HTTP 503")  # two in a row: down
    h.observe(False, False, "HTTP 503")
    h.observe(True, False, "")
    h.observe(False, True, "refused")  # process gone: down at once
    assert log == ["up", "down gone=False", "up", "down gone=True"]


def test_not_serving_at_start_is_down_then_up() -> None:
    h, log = monitor(failures=3)
    h.observe(False, True, "refused")
    h.observe(True, False, "")
    assert log == ["down gone=True", "up"] and h.up is True


async def _ok(_r: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _sick(_r: web.Request) -> web.Response:
    return web.Response(status=503)


async def test_real_checks() -> None:
    app = web.Application()
    app.router.add_get("/health", _ok)
    app.router.add_get("/sick", _sick)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            h, _ = monitor()
            h.url = f"http://127.0.0.1:{port}/health"
            assert await h.check(session) == (True, False, "")
            h.url = f"http://127.0.0.1:{port}/sick"
            ok, gone, why = await h.check(session)
            assert not ok and not gone and "HTTP 503" in why
            h.url = f"http://127.0.0.1:{free_port()}/health"
            ok, gone, why = await h.check(session)
            assert not ok and gone and "cannot connect" in why
    finally:
        await runner.cleanup()
