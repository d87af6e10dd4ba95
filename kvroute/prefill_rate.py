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
restarts the window.

Which tokens: vLLM observes ``vllm:request_prefill_kv_computed_tokens`` (tokens computed, cache
hits excluded) per finished request together with its prefill time, so the pair is aligned and
any window is exact. Older vLLM lacks it; then the tokens are ``prompt_tokens_total`` (counted
when the first token comes) minus ``prefix_cache_hits_total`` (counted when the request is
scheduled), which lead the prefill time (counted when the request finishes) by the request's
decode. A short window then holds a small difference of two large counters taken at other
moments: on the Mooncake sample (1,000 requests, 4 engines, affinity routing, true 30,000 tok/s)
1-s windows read 25 % high on average, 27,600-46,400 at the end. ``update(..., aligned=False)``
therefore closes windows only after ``unaligned_window_s`` (10 s) of prefill time: there
0.99x on average. Caveat for vLLM: requests prefilled in the same step each count the whole
step, so under batched prefill the measured rate errs low (the safe side: the help text of the
flag measures 2x too low as nearly free).
"""

from __future__ import annotations


class PrefillRateEstimator:
    """Prefill tokens/s from cumulative (computed tokens, prefill seconds) totals."""

    def __init__(self, min_window_s: float = 1.0, smoothing: float = 0.3,
                 min_rate: float = 1.0, max_rate: float = 1e9,
                 unaligned_window_s: float = 10.0) -> None:
        if min_window_s <= 0 or not 0 < smoothing <= 1 or not 0 < min_rate < max_rate \
                or unaligned_window_s < min_window_s:
            raise ValueError("min_window_s must be > 0, smoothing in (0, 1], "
                             "0 < min_rate < max_rate, unaligned_window_s >= min_window_s")
        self.min_window_s = min_window_s
        self.unaligned_window_s = unaligned_window_s
        self.smoothing = smoothing
        self.min_rate = min_rate
        self.max_rate = max_rate
        self._base: tuple[float, float] | None = None
        self._aligned = True
        self.rate = 0.0
        """The current estimate (0 = not measured yet)."""
        self.windows = 0
        """Windows folded into the estimate."""

    def update(self, computed_tokens_total: float, prefill_seconds_total: float,
               aligned: bool = True) -> float:
        """Fold in the engine's totals as of now; returns the estimate (0 = unknown yet).

        ``aligned=False``: the tokens are not counted when the prefill time is (prompt minus
        cache-hit counters), so windows are ``unaligned_window_s`` long.
        """
        if aligned != self._aligned:  # another source: its totals are not comparable
            self._aligned = aligned
            self._base = None
        if self._base is None:
            self._base = (computed_tokens_total, prefill_seconds_total)
            return self.rate
        tok0, sec0 = self._base
        d_tok = computed_tokens_total - tok0
        d_sec = prefill_seconds_total - sec0
        if d_tok < 0 or d_sec < 0:  # counters reset: the engine restarted
            self._base = (computed_tokens_total, prefill_seconds_total)
            return self.rate
        window = self.min_window_s if aligned else self.unaligned_window_s
        if d_sec < window or d_tok <= 0:
            return self.rate
        sample = min(self.max_rate, max(self.min_rate, d_tok / d_sec))
        self.rate = sample if self.windows == 0 else \
            self.rate + self.smoothing * (sample - self.rate)
        self.windows += 1
        self._base = (computed_tokens_total, prefill_seconds_total)
        return self.rate
