"""The registry's shutdown is cancellation-safe: a serve() task cancelled while its route-share
relay stops still drains its streams, closes its gRPC port and its metrics server (real
in-process server, memory store; the relay is a stand-in that never finishes stopping)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from registry_service import server as registry_server
from registry_service.servicer import RegistryServicer
from registry_service.settings import RegistrySettings


class _StuckRelay:
    """A relay whose stop() waits forever (a peer that never answers its goodbye)."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.sleep(3600)


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_cancelled_during_relay_stop_still_closes_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    relay = _StuckRelay()
    drained: list[bool] = []
    real_drain = RegistryServicer.drain

    async def drain(self: Any) -> None:
        drained.append(True)
        await real_drain(self)

    monkeypatch.setattr(registry_server, "make_relay", lambda *a, **k: relay)
    monkeypatch.setattr(RegistryServicer, "drain", drain)
    ready = tmp_path / "ready.json"
    settings = RegistrySettings(store="memory", listen="127.0.0.1:0",
                                metrics_listen="127.0.0.1:0", ready_file=str(ready))
    stop = asyncio.Event()
    task = asyncio.create_task(registry_server.serve(settings, stop))
    for _ in range(500):
        if ready.exists():
            break
        await asyncio.sleep(0.02)
    info = json.loads(ready.read_text())
    port, metrics_port = info["grpc_port"], info["metrics_port"]
    assert not _refused(port)
    stop.set()
    await asyncio.wait_for(relay.stopping.wait(), 30)
    task.cancel()  # e.g. the embedding program gives up on the slow stop
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert drained == [True]  # the streams were ended
    assert _refused(port)  # the gRPC server stopped
    assert _refused(metrics_port)  # and so did the metrics server
