"""Settings of the kvroute clients: addresses, deadlines, retries with back-off, TLS."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from kvroute.settings import TLSSettings

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})
"""Codes worth another attempt: the server (or this address) may answer next time."""


@dataclass(frozen=True)
class ClientOptions:
    """How a client reaches a kvroute service.

    ``targets`` are tried in order: a retryable failure on one moves to the next (several
    registry or router replicas behind one client). Every call has a deadline (``timeout_s``,
    overridable per call); a call is tried at most ``attempts`` times in all, sleeping an
    exponentially growing, jittered back-off between attempts (capped by ``backoff_max_s``
    and by what is left of ``total_timeout_s``).
    """

    targets: Sequence[str]
    """``HOST:PORT`` addresses of replicas of the same service."""
    timeout_s: float = 2.0
    """Deadline of one attempt."""
    total_timeout_s: float = 10.0
    """Deadline of a call over all its attempts."""
    attempts: int = 3
    """Attempts per call (1 = no retry)."""
    backoff_initial_s: float = 0.05
    """First back-off; doubles per attempt."""
    backoff_max_s: float = 1.0
    """Longest back-off."""
    retry_codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE)
    """Status codes that are retried (others raise at once)."""
    tls: TLSSettings | None = None
    """TLS to the service (``ca_file`` to verify it; ``cert_file``/``key_file`` for mTLS)."""

    def __post_init__(self) -> None:
        if not self.targets or any(not t or ":" not in t for t in self.targets):
            raise ValueError(f"targets: give one or more HOST:PORT addresses, got "
                             f"{list(self.targets)!r}")
        if self.timeout_s <= 0 or self.total_timeout_s <= 0:
            raise ValueError("timeout_s and total_timeout_s must be > 0")
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")

    def backoffs(self, rng: random.Random | None = None) -> Iterator[float]:
        """Sleep before attempt 2, 3, ...: full jitter over a doubling, capped window."""
        r = rng or random.Random()
        window = self.backoff_initial_s
        while True:
            yield r.uniform(0.5, 1.0) * window
            window = min(window * 2, self.backoff_max_s)
