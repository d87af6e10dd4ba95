"""Per-policy metrics from a :class:`bench.results.PolicyRun` (engine-measured numbers)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bench.results import PolicyRun


def _pcts(values: list[float]) -> dict[str, float]:
    arr = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    p50, p90, p99 = np.percentile(arr * 1000.0, [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1),
            "p99": round(float(p99), 1)}


def policy_metrics(run: PolicyRun, merged_lru_hit: float, oracle_hit: float) -> dict[str, Any]:
    """The JSON ``results`` entry of one policy (schema in bench/README.md)."""
    served = [i for i, n in enumerate(run.node) if n >= 0]
    prompt = sum(run.prompt_tokens[i] for i in served)
    cached = sum(run.cached_tokens[i] for i in served)
    predicted = sum(run.predicted_cached_tokens[i] for i in served)
    hit = cached / prompt if prompt else 0.0
    # a request "hits" when the engine served at least half of its prompt from cache (on
    # Mooncake traces every request shares block 0, so "any cached block" would be ~1.0)
    req_hits = sum(1 for i in served if 2 * run.cached_tokens[i] >= run.prompt_tokens[i] > 0)
    counts = [0] * len(run.node_ids)
    for i in served:
        counts[run.node[i]] += 1
    mean = sum(counts) / len(counts) if counts else 0.0
    t0 = min((run.arrival_s[i] for i in served), default=0.0)
    span = max(1e-9, run.t_end_s - t0)
    completed = sum(1 for i in served if not math.isnan(run.e2e_s[i]))
    return {
        "policy": run.policy,
        "hit_rate_tokens": round(hit, 4),
        "hit_rate_requests": round(req_hits / len(served), 4) if served else 0.0,
        "predicted_hit_rate_tokens": round(predicted / prompt, 4) if prompt else 0.0,
        "ttft_ms": _pcts(run.ttft_s),
        "e2e_ms": _pcts(run.e2e_s),
        "throughput_rps": round(completed / span, 3),
        "load_max_over_mean": round(max(counts) / mean, 3) if mean else 0.0,
        "utilization": round(sum(run.busy_s) / (len(run.busy_s) * span), 3)
        if run.busy_s else 0.0,
        "evictions": run.evictions,
        "failed": run.failed,
        "hit_ratio_to_merged_lru": round(hit / merged_lru_hit, 3) if merged_lru_hit else None,
        "hit_ratio_to_oracle": round(hit / oracle_hit, 3) if oracle_hit else None,
        "requests_per_node": counts,
        "replay_wall_s": round(run.wall_s, 2),
        "arrival_lag_ms": _pcts(run.arrival_lag_s) if run.arrival_lag_s else None,
        "return_lag_ms": _pcts(run.return_lag_s) if run.return_lag_s else None,
        "load_avg_1m": list(run.load_avg) if run.load_avg is not None else None,
        "cpu_busy": run.cpu_busy,
        "notes": list(run.notes),
        **({"replica_view": run.replica_view} if run.replica_view is not None else {}),
    }
