"""Router, gateway and endpoint-picker shutdowns run every step: a step that raises does not
leave the later ones undone (the port listening, the registry link or the metrics server
running). Real in-process servers; the registry address has nothing behind it (the services
start without one). The failing step is one of our own methods made to raise."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kvroute.procs import free_port
from router_service import server as router_server
from router_service.epp import server as epp_server
from router_service.epp.settings import EppSettings
from router_service.gateway import server as gateway_server
from router_service.gateway.settings import GatewaySettings
from router_service.model_catalog import ModelCatalog
from router_service.runtime import RoutingRuntime
from router_service.servicer import RouterServicer
from router_service.settings import RouterSettings


class Boom(RuntimeError):
    """The failure injected into one shutdown step."""


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _record_runtime_stops(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    stopped: list[bool] = []
    real_stop = RoutingRuntime.stop

    async def stop(self: RoutingRuntime) -> None:
        await real_stop(self)
        stopped.append(True)

    monkeypatch.setattr(RoutingRuntime, "stop", stop)
    return stopped


def _ready_info(ready: Path) -> dict[str, Any] | None:
    text = ready.read_text() if ready.exists() else ""
    return json.loads(text) if text.strip() else None


async def _boom(*args: Any, **kwargs: Any) -> Any:
    raise Boom("injected shutdown failure")


async def _serve_then_stop(serve: Callable[[asyncio.Event], Awaitable[int]], ready: Path,
                           port_key: str) -> tuple[int, int]:
    """Start ``serve``, wait for its ready file, set stop; expects the injected failure to be
    raised (after every step ran). Returns the service and metrics ports."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(stop))
    info = None
    for _ in range(500):
        if (info := _ready_info(ready)) is not None:
            break
        if task.done():
            await task
        await asyncio.sleep(0.02)
    assert info is not None, "the service did not start"
    port, metrics_port = info[port_key], info["metrics_port"]
    assert not _refused(port) and not _refused(metrics_port)
    stop.set()
    with pytest.raises(Boom):
        await asyncio.wait_for(task, 30)
    return port, metrics_port


def _common(tmp_path: Path) -> dict[str, Any]:
    return {"registry": f"127.0.0.1:{free_port()}", "metrics_listen": "127.0.0.1:0",
            "ready_file": str(tmp_path / "ready.json"), "drain_timeout_s": 1.0}


async def test_router_drain_failure_still_stops_server_link_and_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stopped = _record_runtime_stops(monkeypatch)
    monkeypatch.setattr(RouterServicer, "drain", _boom)
    settings = RouterSettings(listen="127.0.0.1:0", **_common(tmp_path))
    port, metrics_port = await _serve_then_stop(
        lambda stop: router_server.serve(settings, stop=stop), tmp_path / "ready.json",
        "grpc_port")
    assert _refused(port)  # the gRPC server stopped after the failed drain
    assert stopped == [True]  # the registry link stopped
    assert _refused(metrics_port)  # and so did the metrics server


async def test_gateway_catalog_failure_still_stops_link_session_and_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stopped = _record_runtime_stops(monkeypatch)
    sessions: list[Any] = []
    real_start = gateway_server.Gateway.start

    async def start(self: gateway_server.Gateway) -> int:
        port = await real_start(self)
        sessions.append(self.session)
        return port

    monkeypatch.setattr(gateway_server.Gateway, "start", start)
    monkeypatch.setattr(ModelCatalog, "stop", _boom)
    settings = GatewaySettings(listen="127.0.0.1:0", **_common(tmp_path))
    port, metrics_port = await _serve_then_stop(
        lambda stop: gateway_server.serve(settings, stop=stop), tmp_path / "ready.json",
        "http_port")
    assert _refused(port)  # HTTP drained before the failing step
    assert stopped == [True]  # the registry link stopped after it
    assert sessions and sessions[0].closed  # the upstream session was closed
    assert _refused(metrics_port)  # and the metrics server stopped


async def test_epp_runtime_failure_still_closes_session_and_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RoutingRuntime, "stop", _boom)
    sessions: list[Any] = []
    real_session = epp_server.aiohttp.ClientSession

    def session(*args: Any, **kwargs: Any) -> Any:
        sessions.append(real_session(*args, **kwargs))
        return sessions[-1]

    monkeypatch.setattr(epp_server.aiohttp, "ClientSession", session)
    settings = EppSettings(listen="127.0.0.1:0", **_common(tmp_path))
    port, metrics_port = await _serve_then_stop(
        lambda stop: epp_server.serve(settings, stop=stop), tmp_path / "ready.json",
        "grpc_port")
    assert _refused(port)  # the ext_proc server stopped before the failing step
    assert sessions and sessions[0].closed  # the tokenizer session closed after it
    assert _refused(metrics_port)  # the metrics server stopped after it
