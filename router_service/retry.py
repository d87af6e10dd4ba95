"""Reconnect and retry helpers (tenacity, exponential back-off with full jitter)."""

from __future__ import annotations

import logging

import grpc
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_random_exponential,
)

from kvroute.grpcutil import reconnect_options

__all__ = ["LinkNeverUp", "call_retrying", "reconnect_options", "reconnect_retrying"]

log = logging.getLogger(__name__)


class LinkNeverUp(Exception):
    """A registry stream ended before it was ever established (retry with growing back-off)."""


def reconnect_retrying(max_wait_s: float) -> AsyncRetrying:
    """Retry forever on connection failures, waiting 0..min(max, 0.05 * 2**n) s (jittered)."""
    return AsyncRetrying(
        wait=wait_random_exponential(multiplier=0.05, max=max_wait_s),
        before_sleep=before_sleep_log(log, logging.DEBUG),
        retry=retry_if_exception_type((grpc.aio.AioRpcError, LinkNeverUp, OSError)),
        stop=stop_never, reraise=True)


def call_retrying(attempts: int = 3, max_wait_s: float = 0.2) -> AsyncRetrying:
    """A few jittered retries of a unary call on UNAVAILABLE-type failures."""
    return AsyncRetrying(
        wait=wait_random_exponential(multiplier=0.02, max=max_wait_s),
        retry=retry_if_exception_type((grpc.aio.AioRpcError, OSError)),
        stop=stop_after_attempt(attempts), reraise=True)
