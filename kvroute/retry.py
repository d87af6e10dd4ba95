"""The one retry helper: jittered exponential back-off over tenacity.

Every retry loop of the services (the router's registry links, the node agent's registry link,
the registry's etcd calls) is built here, so they share one meaning of "back-off": attempt n
waits about ``first_s * 2**n`` seconds, never more than ``max_s``, with jitter so many clients
that lost the same server do not come back in step. Callers say only what to retry, how long to
wait and how often to try::

    async for attempt in retrying(grpc.aio.AioRpcError, first_s=0.05, max_s=2.0):
        with attempt:
            await connect()

(The typed clients in :mod:`kvroute.client` run their own loop, sync and async alike, because
each retry there also moves to the next server address within one overall deadline.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_random,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""What is retried: exception types, or a predicate on the exception."""


def retrying(retry_on: RetryOn, *, first_s: float, max_s: float, attempts: int | None = None,
             jitter: Literal["full", "added"] = "full",
             before_sleep: Callable[[RetryCallState], None] | None = None) -> AsyncRetrying:
    """An ``async for`` retry loop; the last failure is re-raised as it is.

    ``attempts`` = tries in all (None = until the caller is cancelled). ``jitter="full"`` waits
    uniformly in 0..min(max_s, first_s * 2**n) (AWS "full jitter", the best spread);
    ``"added"`` waits min(max_s, first_s * 2**n) plus 0..first_s/2 (a predictable cadence, for
    loops that must try again within a bound, such as a heartbeat interval).
    ``before_sleep`` sees each failed attempt (for logs and metrics).
    """
    if first_s <= 0 or max_s < 0:
        raise ValueError(f"back-off needs first_s > 0 and max_s >= 0 (got {first_s}, {max_s})")
    if attempts is not None and attempts < 1:
        raise ValueError(f"attempts must be >= 1 or None (got {attempts})")
    wait: wait_base
    if jitter == "full":
        wait = wait_random_exponential(multiplier=first_s, max=max_s)
    else:
        wait = wait_exponential(multiplier=first_s, max=max_s) + wait_random(0, first_s / 2)
    stop: stop_base = stop_never if attempts is None else stop_after_attempt(attempts)
    retry: retry_if_exception = (retry_if_exception_type(retry_on)
                                 if isinstance(retry_on, (type, tuple))
                                 else retry_if_exception(retry_on))
    return AsyncRetrying(wait=wait, stop=stop, retry=retry, reraise=True,
                         before_sleep=before_sleep)
