"""An engine's prefill rate (tokens/s), learned from its cumulative metrics (issue 19).

kv_aware converts queued and uncached prefill into seconds of TTFT with a prefill rate; one global
``--kv-prefill-tokens-per-s`` is a guess (3x too high costs about +57 % p90 TTFT on the full
conversation trace). Engines export what is needed to measure it: vLLM's
``vllm:request_prefill_time_seconds`` histogram (its ``_sum``: seconds spent in prefill, over
finished requests) and the prompt tokens it computed (``vllm:prompt_tokens_total`` minus
``vllm:prefix_cache_hits_total``). The node agent (scraping ``/metrics``) and the in-process sim
(reading engine_sim's counters) feed both cumulative totals to a :class:`PrefillRateEstimator`;
the rate travels in the heartbeat to the registry and on to every router.

The estimate is Δtokens / Δseconds over a window holding at least ``min_window_s`` of prefill
time, smoothed exponentially across windows; a counter that goes backwards (engine restart)
restarts the window. Caveat for vLLM: requests prefilled in the same step each count the whole
step, so under batched prefill the measured rate errs low (the safe side: the help text of the
flag measures 2x too low as nearly free).
"""

from __future__ import annotations


class PrefillRateEstimator:
    """Prefill tokens/s from cumulative (computed tokens, prefill seconds) totals."""

    def __init__(self, min_window_s: float = 1.0, smoothing: float = 0.3,
                 min_rate: float = 1.0, max_rate: float = 1e9) -> None:
        if min_window_s <= 0 or not 0 < smoothing <= 1 or not 0 < min_rate < max_rate:
            raise ValueError("min_window_s must be > 0, smoothing in (0, 1], "
                             "0 < min_rate < max_rate")
        self.min_window_s = min_window_s
        self.smoothing = smoothing
        self.min_rate = min_rate
        self.max_rate = max_rate
        self._base: tuple[float, float] | None = None
        self.rate = 0.0
        """The current estimate (0 = not measured yet)."""
        self.windows = 0
        """Windows folded into the estimate."""

    def update(self, computed_tokens_total: float, prefill_seconds_total: float) -> float:
        """Fold in the engine's totals as of now; returns the estimate (0 = unknown yet)."""
        if self._base is None:
            self._base = (computed_tokens_total, prefill_seconds_total)
            return self.rate
        tok0, sec0 = self._base
        d_tok = computed_tokens_total - tok0
        d_sec = prefill_seconds_total - sec0
        if d_tok < 0 or d_sec < 0:  # counters reset: the engine restarted
            self._base = (computed_tokens_total, prefill_seconds_total)
            return self.rate
        if d_sec < self.min_window_s or d_tok <= 0:
            return self.rate
        sample = min(self.max_rate, max(self.min_rate, d_tok / d_sec))
        self.rate = sample if self.windows == 0 else \
            self.rate + self.smoothing * (sample - self.rate)
        self.windows += 1
        self._base = (computed_tokens_total, prefill_seconds_total)
        return self.rate
