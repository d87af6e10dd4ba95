"""The one retry helper (``kvroute.retry.retrying``): what it retries, how often, how long."""

from __future__ import annotations

import asyncio

import pytest
from tenacity import RetryCallState

from kvroute.retry import retrying


class Flaky(Exception):
    pass


async def _run(fail_times: int, exc: BaseException, **kw: object) -> int:
    calls = 0

    async def attempt() -> int:
        nonlocal calls
        calls += 1
        if calls <= fail_times:
            raise exc
        return calls

    async for state in retrying(**kw):  # type: ignore[arg-type]
        with state:
            return await attempt()
    raise AssertionError("unreachable")


def test_retries_the_named_types_until_success() -> None:
    assert asyncio.run(_run(3, Flaky(), retry_on=Flaky, first_s=0.001, max_s=0.002)) == 4


def test_other_exceptions_and_the_last_failure_propagate_unchanged() -> None:
    with pytest.raises(KeyError):
        asyncio.run(_run(1, KeyError("k"), retry_on=(Flaky, OSError), first_s=0.001, max_s=0.001))
    with pytest.raises(Flaky):
        asyncio.run(_run(5, Flaky(), retry_on=Flaky, first_s=0.001, max_s=0.001, attempts=3))


def test_a_predicate_decides_and_before_sleep_sees_each_failure() -> None:
    seen: list[float] = []

    def note(state: RetryCallState) -> None:
        assert state.next_action is not None
        seen.append(state.next_action.sleep)

    out = asyncio.run(_run(2, Flaky("again"), retry_on=lambda e: "again" in str(e),
                           first_s=0.001, max_s=0.004, jitter="added", before_sleep=note))
    assert out == 3
    assert len(seen) == 2
    # added jitter: min(max, first * 2**n) + 0..first/2
    assert all(0.001 <= w <= 0.004 + 0.0005 for w in seen)


def test_full_jitter_never_waits_past_the_cap() -> None:
    seen: list[float] = []

    def note(state: RetryCallState) -> None:
        assert state.next_action is not None
        seen.append(state.next_action.sleep)

    asyncio.run(_run(6, Flaky(), retry_on=Flaky, first_s=0.001, max_s=0.003, before_sleep=note))
    assert len(seen) == 6 and all(0 <= w <= 0.003 for w in seen)


def test_bad_back_off_is_refused() -> None:
    with pytest.raises(ValueError, match="first_s"):
        retrying(Flaky, first_s=0, max_s=1)
    with pytest.raises(ValueError, match="attempts"):
        retrying(Flaky, first_s=0.1, max_s=1, attempts=0)
