"""Small asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None, errors_too: bool = False) -> None:
    """Cancel every given task (None entries are skipped), then wait until each has ended.

    The given tasks' own ``CancelledError`` is expected and never raised here. A cancellation
    of the *calling* task while it waits is not swallowed: it propagates at once (every given
    task has already been cancelled by then, but may still be unwinding), so a caller's
    cleanup after this call belongs in a ``finally``. Waiting goes through
    :func:`asyncio.wait`, which never consumes the caller's cancel request, so the caller's
    ``cancelling()`` count stays right and nothing needs ``uncancel()``.

    A task that ended with an exception raises it here (the first in argument order, after
    all have ended) unless ``errors_too`` (shutdown paths that report the first failure
    themselves); either way every task's exception counts as retrieved."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    if not live:
        return
    await asyncio.wait(live)  # raises CancelledError only when the caller is cancelled
    first: BaseException | None = None
    for task in live:
        if task.cancelled():
            continue
        exc = task.exception()
        if first is None and exc is not None:
            first = exc
    if first is not None and not errors_too:
        raise first


async def run_each(*steps: Callable[[], object] | None) -> None:
    """Run every step in order (None entries are skipped; a step's awaitable result is
    awaited), each also when an earlier one raised or the caller was cancelled while it ran,
    then raise the first error, a ``CancelledError`` included. For shutdown paths: a
    cancellation during one step must not skip closing the others (a listening port, a store,
    a metrics server). The caller's cancel request is not consumed: the ``CancelledError``
    it delivered is the one raised at the end."""
    first: BaseException | None = None
    for step in steps:
        if step is None:
            continue
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except BaseException as exc:  # every step runs; the first error is raised after
            if first is None:
                first = exc
            elif not isinstance(exc, asyncio.CancelledError):  # it would be lost: say so
                log.error("shutdown step %r failed after an earlier error", step,
                          exc_info=exc)
    if first is not None:
        raise first


def stop_on_signals(stop: asyncio.Event | None) -> asyncio.Event:
    """``stop`` when given (tests, embedding); else a new event that SIGTERM and SIGINT set on
    the running loop (where signal handlers can be installed)."""
    if stop is not None:
        return stop
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop
