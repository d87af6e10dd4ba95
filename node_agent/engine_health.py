"""Engine liveness: poll the engine's health endpoint every heartbeat interval.

vLLM and SGLang both answer ``GET /health`` with 200 while serving (engine_sim too). A refused
or reset connection means the engine process is gone (beside it, on loopback): the engine is
down at once and its KV cache with it. Timeouts and HTTP errors count as down after
``failures`` checks in a row (a busy engine may miss one). The first successful check after a
down period reports it up again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

log = logging.getLogger(__name__)
MIN_INTERVAL_S = 0.2
"""Checks are never more frequent than this (fast bench heartbeats would load the engine)."""


class EngineHealth:
    """Calls ``on_down(why, process_gone)`` / ``on_up()`` on state changes."""

    def __init__(self, url: str, timeout_s: float, failures: int,
                 interval_s: Callable[[], float],
                 on_down: Callable[[str, bool], None], on_up: Callable[[], None]) -> None:
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._failures = failures
        self._interval_s = interval_s
        self._on_down = on_down
        self._on_up = on_up
        self.up: bool | None = None
        """None until the first check; then the engine's state."""
        self.checks = 0
        self.failed_checks = 0
        self._in_a_row = 0

    async def check(self, session: aiohttp.ClientSession) -> tuple[bool, bool, str]:
        """One check: (healthy, process gone, why not)."""
        self.checks += 1
        try:
            async with session.get(self.url) as resp:
                if resp.status == 200:
                    return True, False, ""
                return False, False, f"GET {self.url} answered HTTP {resp.status}"
        except aiohttp.ClientConnectorError as exc:
            return False, True, f"GET {self.url}: cannot connect ({exc.os_error})"
        except (aiohttp.ServerDisconnectedError, ConnectionResetError) as exc:
            return False, True, f"GET {self.url}: connection lost ({exc!r})"
        except TimeoutError:
            return False, False, f"GET {self.url}: no answer within {self._timeout.total} s"
        except aiohttp.ClientError as exc:
            return False, False, f"GET {self.url}: {exc!r}"

    def observe(self, ok: bool, gone: bool, why: str) -> None:
        """Apply one check's result (separate from I/O so it is easy to test)."""
        if ok:
            self._in_a_row = 0
            if self.up is not True:
                self.up = True
                self._on_up()
            return
        self.failed_checks += 1
        self._in_a_row += 1
        if self.up is not False and (gone or self._in_a_row >= self._failures
                                     or self.up is None):
            self.up = False
            self._on_down(why, gone)

    async def run(self) -> None:
        """Check until cancelled."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            while True:
                ok, gone, why = await self.check(session)
                if not ok and (self.failed_checks < 3 or self.failed_checks % 100 == 0):
                    log.warning("engine health check failed (%d so far): %s",
                                self.failed_checks + 1, why)
                self.observe(ok, gone, why)
                await asyncio.sleep(max(MIN_INTERVAL_S, self._interval_s()))
