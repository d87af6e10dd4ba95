"""kvroute.aio.cancel_and_wait: cancels and waits; a task's own failure surfaces unless
``errors_too``."""

from __future__ import annotations

import asyncio

import pytest

from kvroute.aio import cancel_and_wait


async def _fail() -> None:
    raise ValueError("boom")


async def test_cancels_and_waits_and_skips_none() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    await cancel_and_wait(task, None)
    assert task.cancelled()


async def test_failed_task_raises_unless_errors_too() -> None:
    failed = asyncio.create_task(_fail())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="boom"):
        await cancel_and_wait(failed)
    again = asyncio.create_task(_fail())
    running = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    await cancel_and_wait(again, running, errors_too=True)
    assert running.cancelled() and again.done()
