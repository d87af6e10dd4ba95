"""One ``kvroute bench`` comparison: bounds, every policy's replay, the report object."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from bench.backend import Backend
from bench.bounds import Bound, LatencyFloor, latency_floor, merged_lru, oracle
from bench.contention import MachineSampler, contention_bound
from bench.metrics import policy_metrics
from bench.results import PolicyRun
from bench.sim.config import SimSettings
from bench.workloads.base import Workload


def default_cache_blocks(workload: Workload, nodes: int, fraction: float = 0.25) -> int:
    """``fraction`` of the workload's distinct blocks spread over ``nodes`` (at least 1)."""
    return max(1, round(fraction * workload.distinct_blocks() / nodes))


def resolve_settings(workload: Workload, settings: SimSettings) -> SimSettings:
    """Fill in the defaults that depend on the workload (cache size, block size)."""
    changes: dict[str, Any] = {}
    if settings.cache_blocks == 0:
        changes["cache_blocks"] = default_cache_blocks(workload, settings.nodes)
    if settings.block_size == 0:
        changes["block_size"] = workload.block_size
    return dataclasses.replace(settings, **changes) if changes else settings


@dataclass
class BenchOutcome:
    """Everything a report, JSON file or plot needs."""

    report: dict[str, Any]
    runs: list[PolicyRun]
    oracle: Bound
    merged: Bound
    floor: LatencyFloor | None
    """The shared-queue latency floor (None for the ``seed`` latency preset)."""
    workload: Workload
    settings: SimSettings


def run_comparison(workload: Workload, settings: SimSettings, policies: list[str],
                   backend: Backend, random_bound: bool = True) -> BenchOutcome:
    """Bounds plus one replay per policy, each on a fresh fleet; the JSON report object.

    ``random_bound=False`` skips the extra ``random`` replay when ``random`` is not among the
    policies (the stack's replays take minutes); the report's random bound is then null.
    """
    t0 = time.perf_counter()
    orc = oracle(workload)
    merged = merged_lru(workload, settings.nodes * settings.cache_blocks)
    floor = latency_floor(workload, merged, settings.nodes, settings.prefill_tokens_per_s) \
        if settings.latency_model == "default" else None
    floor_ms = floor.percentiles_ms() if floor is not None else None
    # the random bound needs a random replay: run it with kvroute's own policies, before any
    # real peer router ("peer:*", each on its own fleet), so kvroute's fleet can stop first
    order = list(policies)
    if "random" not in order and random_bound:
        order.insert(next((i for i, n in enumerate(order) if n.startswith("peer:")),
                          len(order)), "random")
    replayed = {name: _replay(backend, workload, name) for name in order}
    runs = [replayed[name] for name in policies]
    results = [policy_metrics(r, merged.hit_rate_tokens, orc.hit_rate_tokens) for r in runs]
    for m in results:
        m["ttft_ratio_to_floor"] = _ratios(m["ttft_ms"], floor_ms)
        if m.get("arrival_lag_ms"):
            m["contention_bound"] = contention_bound(m)
    random_hit = policy_metrics(replayed["random"], merged.hit_rate_tokens,
                                orc.hit_rate_tokens)["hit_rate_tokens"] \
        if "random" in replayed else None
    report: dict[str, Any] = {
        "workload": workload.name,
        "nodes": settings.nodes,
        "cache_blocks": settings.cache_blocks,
        "model": {
            "latency_model": settings.latency_model,
            "prefill_tokens_per_s": settings.prefill_tokens_per_s,
            "decode_s_per_token": settings.decode_s_per_token,
            "max_batch": settings.max_batch,
            "block_size": settings.block_size,
            "heartbeat_delay_s": settings.heartbeat_delay_s,
        },
        "bounds": {
            "oracle": {"hit_rate_tokens": round(orc.hit_rate_tokens, 4)},
            "merged_lru": {"hit_rate_tokens": round(merged.hit_rate_tokens, 4),
                           "capacity_blocks": settings.nodes * settings.cache_blocks},
            "random": {"hit_rate_tokens": random_hit},
            "latency_floor": None if floor is None or floor_ms is None else {
                "ttft_ms": floor_ms, "utilization": round(floor.utilization, 3),
                "model": f"{settings.nodes} engines behind one FIFO queue, merged-LRU hits, "
                         f"prefill {settings.prefill_tokens_per_s:.0f} tokens/s"},
        },
        "results": results,
        "mode": backend.mode,
        "requests": len(workload.requests),
        "distinct_blocks": workload.distinct_blocks(),
        "arrivals": arrivals_note(workload),
        "source": workload.source,
        "runtime_s": round(time.perf_counter() - t0, 2),
    }
    return BenchOutcome(report, runs, orc, merged, floor, workload, settings)


def arrivals_note(workload: Workload) -> str:
    """How the replay's arrivals relate to the trace's timestamps (one line for the table)."""
    meta = workload.meta
    spread = meta.get("arrival_spread_s")
    if spread:
        return (f"trace {meta.get('arrivals_before_spread', '')}; each tick's requests spread "
                f"over {spread:g} s ({meta.get('arrival_spread_shape', 'even')}, "
                f"--arrival-spread-s)")
    ticks = workload.arrival_ticks()
    if ticks.quantised:
        return (f"{ticks.describe()}; replayed as they are (same-instant bursts: "
                f"--arrival-spread-s {ticks.median_gap_s:.0f} spreads each tick's requests)")
    return ticks.describe()


def _replay(backend: Backend, workload: Workload, name: str) -> PolicyRun:
    """One replay, with the machine's load and CPU use while it ran (stack modes: the
    wall-clock replays those can disturb)."""
    if backend.mode == "sim":
        return backend.replay(workload, name)
    sampler = MachineSampler()
    sampler.start()
    run = backend.replay(workload, name)
    run.load_avg, run.cpu_busy = sampler.stop()
    return run


def _ratios(ttft_ms: dict[str, float],
            floor_ms: dict[str, float] | None) -> dict[str, float] | None:
    """Each TTFT percentile divided by the floor's (None without a floor)."""
    if floor_ms is None:
        return None
    return {k: round(ttft_ms[k] / floor_ms[k], 2) if floor_ms[k] > 0 else float("nan")
            for k in ("p50", "p90", "p99")}
