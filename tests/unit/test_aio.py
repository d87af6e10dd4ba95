"""kvroute.aio.cancel_and_wait: cancels and waits; the tasks' own cancellation is suppressed, the
caller's propagates; a task's own failure surfaces unless ``errors_too``. kvroute.aio.run_each:
every shutdown step runs, also after a failed or cancelled one; the first error is raised."""

from __future__ import annotations

import asyncio

import pytest

from kvroute.aio import cancel_and_wait, run_each


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


async def _stubborn(started: asyncio.Event, release: asyncio.Event) -> None:
    """Ends only once ``release`` is set, even when cancelled (a slow cleanup)."""
    started.set()
    try:
        await asyncio.sleep(60)
    finally:
        await release.wait()


async def test_own_cancellation_of_the_tasks_is_suppressed() -> None:
    tasks = [asyncio.create_task(asyncio.sleep(60)) for _ in range(3)]
    await asyncio.sleep(0)
    me = asyncio.current_task()
    assert me is not None
    before = me.cancelling()
    await cancel_and_wait(*tasks)  # no CancelledError here
    assert all(t.cancelled() for t in tasks)
    assert me.cancelling() == before


async def test_callers_cancellation_propagates_after_cancelling_every_task() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    slow = asyncio.create_task(_stubborn(started, release))
    other = asyncio.create_task(asyncio.sleep(60))
    after: list[str] = []

    async def caller() -> None:
        await started.wait()
        await cancel_and_wait(slow, other)
        after.append("carried on")  # must not run: the caller was cancelled

    outer = asyncio.create_task(caller())
    await started.wait()
    await asyncio.sleep(0.01)  # the caller now waits on the slow task
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(outer, 5)
    assert outer.cancelled() and after == []
    assert other.cancelled()
    assert slow.cancelling() == 1 and not slow.done()  # cancelled, still cleaning up
    release.set()
    await asyncio.wait({slow}, timeout=5)
    assert slow.cancelled()


async def test_callers_cancellation_propagates_with_errors_too() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    slow = asyncio.create_task(_stubborn(started, release))
    await started.wait()
    outer = asyncio.create_task(cancel_and_wait(slow, errors_too=True))
    await asyncio.sleep(0.01)
    outer.cancel()
    done, _ = await asyncio.wait({outer}, timeout=5)
    assert done and outer.cancelled()
    release.set()
    await asyncio.wait({slow}, timeout=5)


async def test_pending_cancel_of_the_caller_is_not_lost() -> None:
    """A cancel requested before the caller reaches the call still ends the caller."""
    inner = asyncio.create_task(asyncio.sleep(60))
    reached: list[str] = []

    async def caller() -> None:
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        await cancel_and_wait(inner)
        reached.append("after")

    outer = asyncio.create_task(caller())
    await asyncio.wait({outer}, timeout=5)
    assert outer.cancelled() and reached == [] and inner.cancelled()


async def test_cleanup_in_finally_of_a_cancelled_caller_still_runs() -> None:
    """Called from a ``finally`` while the caller's own CancelledError unwinds: the given
    task's cancellation is suppressed, so the rest of that cleanup runs."""
    inner = asyncio.create_task(asyncio.sleep(60))
    cleaned: list[str] = []

    async def caller() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await cancel_and_wait(inner)
            cleaned.append("closed")

    outer = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    outer.cancel()
    await asyncio.wait({outer}, timeout=5)
    assert outer.cancelled() and cleaned == ["closed"] and inner.cancelled()


async def test_waits_for_every_task_before_raising_the_first_error() -> None:
    failed = asyncio.create_task(_fail())
    started, release = asyncio.Event(), asyncio.Event()
    slow = asyncio.create_task(_stubborn(started, release))
    await started.wait()
    asyncio.get_running_loop().call_later(0.05, release.set)
    with pytest.raises(ValueError, match="boom"):
        await asyncio.wait_for(cancel_and_wait(failed, slow), 5)
    assert slow.cancelled()


async def test_run_each_runs_every_step_and_raises_the_first_error() -> None:
    done: list[str] = []

    async def step(name: str, exc: BaseException | None = None) -> None:
        await asyncio.sleep(0)
        done.append(name)
        if exc is not None:
            raise exc

    with pytest.raises(ValueError, match="first"):
        await run_each(lambda: step("a", ValueError("first")), None,
                       lambda: step("b", KeyError("second")), lambda: done.append("sync"))
    assert done == ["a", "b", "sync"]


async def test_run_each_runs_the_later_steps_when_the_caller_is_cancelled_in_one() -> None:
    """A shutdown cancelled during one step (a relay that will not stop) still closes the
    rest, then the cancellation propagates."""
    in_slow = asyncio.Event()
    done: list[str] = []

    async def slow() -> None:
        in_slow.set()
        await asyncio.sleep(60)

    async def close() -> None:
        await asyncio.sleep(0.01)  # awaits again after the cancellation: not interrupted
        done.append("closed")

    task = asyncio.create_task(run_each(slow, close, lambda: done.append("metrics")))
    await in_slow.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["closed", "metrics"]
