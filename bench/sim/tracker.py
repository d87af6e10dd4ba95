"""The router's load tracker on the simulated clock.

The replay uses the router's own :class:`router_service.load.LoadTracker` (in-flight counts and
the pending-prefill estimate that drains at the configured prefill rate), driven by a clock that
returns simulated time, so policies see exactly the load signals the served router computes.
"""

from __future__ import annotations

from router_service.load import LoadTracker


class SimTracker(LoadTracker):
    """A LoadTracker whose clock is the ``now`` attribute (set by the replay)."""

    def __init__(self, prefill_tokens_per_s: float) -> None:
        self.now = 0.0
        # Completions always arrive in the replay: no in-flight timeout, no size bound.
        super().__init__(clock=self.clock_now, inflight_timeout_s=1e12,
                         prefill_tokens_per_s=prefill_tokens_per_s, max_tracked=10**9)

    def clock_now(self) -> float:
        """The simulated time."""
        return self.now


def make_tracker(prefill_tokens_per_s: float) -> SimTracker:
    """A tracker for one replay."""
    return SimTracker(prefill_tokens_per_s)
