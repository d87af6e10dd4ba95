"""The registry links' retry policies (on :func:`kvroute.retry.retrying`) and failure logging."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from tenacity import AsyncRetrying, before_sleep_log

from kvroute.grpcutil import reconnect_options
from kvroute.retry import retrying

__all__ = ["LinkNeverUp", "call_retrying", "reconnect_options", "reconnect_retrying"]

log = logging.getLogger(__name__)


class LinkNeverUp(Exception):
    """A registry stream ended before it was ever established (retry with growing back-off)."""


def reconnect_retrying(max_wait_s: float) -> AsyncRetrying:
    """Retry forever on connection failures, waiting 0..min(max, 0.05 * 2**n) s (jittered)."""
    return retrying((grpc.aio.AioRpcError, LinkNeverUp, OSError), first_s=0.05,
                    max_s=max_wait_s, before_sleep=before_sleep_log(log, logging.DEBUG))


def call_retrying(attempts: int = 3, max_wait_s: float = 0.2) -> AsyncRetrying:
    """A few jittered retries of a unary call on UNAVAILABLE-type failures."""
    return retrying((grpc.aio.AioRpcError, OSError), first_s=0.02, max_s=max_wait_s,
                    attempts=attempts)


class LinkLog:
    """Logs the registry link's failures at once and its recovery, without flooding.

    The first failure (at startup, or after the link was up) is a WARNING naming the address
    and the error, so a wrong ``--registry`` shows in the log within one connect attempt; while
    it keeps failing, a reminder at most every ``every_s`` seconds with the attempt count.
    """

    def __init__(self, target: str, what: str, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._target = target
        self._what = what
        self._every_s = every_s
        self._clock = clock
        self._failures = 0
        self._last_log = float("-inf")
        self.ever_up = False

    def failed(self, exc: BaseException) -> None:
        """One connect attempt failed."""
        self._failures += 1
        now = self._clock()
        if self._failures == 1 or now - self._last_log >= self._every_s:
            self._last_log = now
            state = ("was up before" if self.ever_up
                     else "has never answered since this router started")
            log.warning("cannot reach the registry at %s (--registry) for the %s: %s "
                        "(%d failed attempt%s; it %s; routing %s until it answers; retrying)",
                        self._target, self._what, _describe(exc), self._failures,
                        "" if self._failures == 1 else "s", state,
                        "degrades to the last known nodes" if self.ever_up
                        else "is UNAVAILABLE and gRPC health NOT_SERVING")

    def up(self) -> None:
        """The link is established."""
        if self._failures:
            log.info("registry at %s reachable again after %d failed attempt%s", self._target,
                     self._failures, "" if self._failures == 1 else "s")
        self._failures = 0
        self._last_log = float("-inf")
        self.ever_up = True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    cause = exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        return f"{cause.code().name}: {cause.details()}"
    if isinstance(exc, TimeoutError):
        return "no connection within --registry-timeout-s"
    return str(exc) or type(exc).__name__
