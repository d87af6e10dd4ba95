"""The agent names the real error when the registry cannot be reached (issue 20): not "the
registry forgot the node again right after registering", which only fits a registry that
answered RegisterNode and then did not know the node."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from kvroute.aio import cancel_and_wait
from kvroute.procs import free_port
from node_agent.server import Agent
from node_agent.settings import AgentSettings


async def test_unreachable_registry_is_logged_as_a_connection_error(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    s = AgentSettings(registry=f"127.0.0.1:{port}", node_id="n1", engine_url="http://e:1",
                      model="m", capacity_blocks=100, rpc_timeout_s=1.0,
                      engine_health_path="")  # no engine here: register without waiting for it
    agent = Agent(s)
    caplog.set_level(logging.WARNING, logger="node_agent.registry_link")
    task = asyncio.create_task(agent.link.run())
    try:
        for _ in range(100):
            if any("retrying in" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
    finally:
        await cancel_and_wait(task)
        with contextlib.suppress(Exception):
            await agent.link.close()
    msgs = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert msgs, "no warning about the failed registry call"
    assert "RegisterNode: UNAVAILABLE" in msgs[0], msgs[0]
    assert "forgot" not in " ".join(msgs)
