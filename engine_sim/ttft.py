"""vLLM's time-to-first-token histogram (``vllm:time_to_first_token_seconds``) for engine_sim.

The same name, labels and buckets as vLLM (``vllm/v1/metrics/loggers.py``), so one dashboard panel
reads both. Observed once per finished request, in model seconds (wall seconds / time_scale).
"""

from __future__ import annotations

import bisect

from prometheus_client.core import HistogramMetricFamily

BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
           7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
"""vLLM's TTFT buckets in seconds."""

NAME = "vllm:time_to_first_token_seconds"


class TtftHistogram:
    """Cumulative bucket counts of TTFT, exported at scrape time."""

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS) + 1)  # last = above the largest bucket
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one request's TTFT."""
        self._counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._sum += seconds

    def family(self, labels: list[str], values: list[str]) -> HistogramMetricFamily:
        """The metric family with cumulative buckets (``+Inf`` = all requests)."""
        fam = HistogramMetricFamily(NAME, "Histogram of time to first token in seconds.",
                                    labels=labels)
        buckets, total = [], 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self._counts, strict=True):
            total += n
            buckets.append((bound, float(total)))
        fam.add_metric(values, buckets, self._sum)
        return fam
