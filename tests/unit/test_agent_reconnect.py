"""The agent's registry link through outages (in-process registry, real gRPC on loopback):
the log names the real cause, a registry that comes back is used within about a second, a
list of registries fails over, and the engine's health takes the node in and out of routing."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from node_agent.block_map import BlockMap
from node_agent.deltas import DeltaLog
from node_agent.registry_link import RegistryLink
from node_agent.settings import AgentSettings
from node_agent.usage import UsageProbe
from tests.unit.test_agent_link import Registry


def link_for(registry: str) -> RegistryLink:
    s = AgentSettings(registry=registry, node_id="n1", engine_url="http://e:1", model="m",
                      capacity_blocks=100, heartbeat_interval_s=0.1, rpc_timeout_s=1.0,
                      engine_health_path="")
    deltas = DeltaLog()
    return RegistryLink(s, BlockMap(16, deltas, capacity_blocks=100), deltas,
                        UsageProbe("", lambda: 0))


async def wait_for(check: object, within_s: float) -> float:
    t0 = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - t0 < within_s, "not in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_real_cause_and_reconnect_within_a_second(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry(tmp_path)
    link = link_for(f"127.0.0.1:{reg.port}")
    caplog.set_level(logging.WARNING, logger="node_agent.registry_link")
    task = asyncio.create_task(link.run())
    try:
        await asyncio.sleep(3.0)  # nobody listens: the back-off grows to its cap
        text = caplog.text
        assert "UNAVAILABLE" in text and "forgot the node" not in text, text
        await reg.start()
        took = await wait_for(lambda: link.stats.connected, 5.0)
        assert took < 1.5, f"reconnected {took:.2f} s after the registry came back"
        # the registry restarts (empty): the node registers again at once
        epoch = link.stats.epoch
        await reg.stop()
        await reg.start()
        await wait_for(lambda: link.stats.connected and link.stats.epoch != epoch, 5.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()
        await reg.stop()


async def test_a_list_of_registries_fails_over(tmp_path: Path) -> None:
    dead = Registry(tmp_path)  # never started
    live = Registry(tmp_path)
    await live.start()
    link = link_for(f"127.0.0.1:{dead.port},127.0.0.1:{live.port}")
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.stats.connected, 5.0)
        assert link.stats.registry_switches >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()
        await live.stop()


async def test_engine_down_deregisters_and_up_registers_again(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    await reg.start()
    link = link_for(f"127.0.0.1:{reg.port}")
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.stats.connected, 5.0)
        first = link.stats.epoch
        link.engine_down("test: engine killed")
        await wait_for(lambda: not link.stats.connected, 2.0)
        assert link.stats.engine_downs == 1 and not link.stats.engine_up
        link.engine_up()
        await wait_for(lambda: link.stats.connected and link.stats.epoch != first, 5.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()
        await reg.stop()
