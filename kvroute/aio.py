"""Small asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None, errors_too: bool = False) -> None:
    """Cancel every given task (None entries are skipped), then wait until each has ended.

    ``errors_too``: a task that had already failed does not raise here either (shutdown paths
    that report the first failure themselves)."""
    live = [t for t in tasks if t is not None]
    quiet: tuple[type[BaseException], ...] = \
        (asyncio.CancelledError, Exception) if errors_too else (asyncio.CancelledError,)
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(*quiet):
            await task
