"""``kvroute bench --mode sim --prefill-nodes P --decode-nodes D``: disaggregated comparison.

Strategies (prefill policy / decode choice), each replayed on a fresh P+D fleet
(:func:`bench.sim.pd_replay.simulate_pd`):

* ``kv_aware/kv_aware`` — kvroute: prefill by prefix overlap and queued prefill, decode by the
  blocks it already holds, KV headroom and load (:mod:`router_service.disagg`);
* ``kv_aware/least_loaded`` — the same prefill choice, decode by load alone (ablation);
* ``sglang/least_loaded`` — prefix-only prefill routing (the sglang-router ``cache_aware``
  re-implementation, as ``--pd-disaggregation --prefill-policy cache_aware`` runs it) with the
  decode node chosen by load alone;
* ``vllm_pd/least_loaded`` — vllm-router's PD mode as the stack head-to-head runs it
  (``--vllm-pd-disaggregation --prefill-policy cache_aware --decode-policy power_of_two``):
  :mod:`bench.peer_policies.vllm_pd` picks the prefill node; with two decode engines
  power-of-two compares both, i.e. decode by load alone;
* ``round_robin/round_robin`` — round-robin pairs;

next to ``kv_aware`` on an *aggregated* fleet of the same total size (P+D engines), and the
disaggregated oracle: the prefill hit rate of one merged LRU of the P prefill caches (the
aggregated ceiling, DESIGN §8, applied to the prefill pool), the blocks a decode pool would
receive if it were one merged LRU of the D decode caches (a reference, not a strict bound: a
router that keeps conversations apart can do a little better than one shared LRU), and the TTFT
floor (P prefill units behind one shared queue with the merged hits, plus that transfer).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.bounds import latency_floor, merged_lru
from bench.metrics import policy_metrics
from bench.policies import build_policy
from bench.sim.config import SimSettings
from bench.sim.pd_replay import PdRun, simulate_pd
from bench.sim.replay import simulate
from bench.sim.timing import RequestTiming
from bench.workloads.base import Workload
from router_service.disagg import DisaggSettings
from router_service.policies.kv_aware import KvAwareSettings

PD_STRATEGIES = ("kv_aware/kv_aware", "kv_aware/least_loaded", "sglang/least_loaded",
                 "vllm_pd/least_loaded", "round_robin/round_robin")
"""Default disaggregated strategies, ``prefill policy/decode choice``."""


def _pcts(values: list[float]) -> dict[str, float]:
    arr = np.array([v for v in values if not math.isnan(v)], dtype=float) * 1000.0
    if arr.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan}
    p50, p90 = np.percentile(arr, [50, 90])
    return {"mean": round(float(arr.mean()), 1), "p50": round(float(p50), 1),
            "p90": round(float(p90), 1)}


def pd_metrics(pd: PdRun) -> dict[str, Any]:
    """The aggregated metrics (hit rate = the prefill engines' cache) plus the decode half."""
    run = pd.run
    m = policy_metrics(run, 0.0, 0.0)
    served = [i for i, n in enumerate(pd.decode_node) if n >= 0]
    prompt = sum(run.prompt_tokens[i] for i in served) or 1
    decode_counts = [0] * (len(run.node_ids) - pd.prefill_nodes)
    for i in served:
        decode_counts[pd.decode_node[i] - pd.prefill_nodes] += 1
    m.update({
        "requests_per_node": m["requests_per_node"][:pd.prefill_nodes],
        "requests_per_decode_node": decode_counts,
        "transferred_blocks": sum(pd.transfer_blocks[i] for i in served),
        "predicted_transferred_blocks": sum(pd.predicted_transfer_blocks[i] for i in served),
        "transfer_s_total": round(sum(pd.transfer_s[i] for i in served), 3),
        "decode_held_rate_tokens": round(sum(pd.decode_held_tokens[i] for i in served)
                                         / prompt, 4),
        "ttft_split_ms": {"queue": _pcts(pd.queue_s), "prefill": _pcts(pd.prefill_s),
                          "transfer": _pcts(pd.transfer_s)},
    })
    return m


def pd_bounds(workload: Workload, settings: SimSettings, prefill_nodes: int,
              decode_nodes: int, transfer_s_per_block: float) -> dict[str, Any]:
    """The disaggregated oracle (module docstring)."""
    bs = settings.block_size or workload.block_size
    pre = merged_lru(workload, prefill_nodes * settings.cache_blocks)
    dec = merged_lru(workload, decode_nodes * settings.cache_blocks)
    lru_transfer = [-(-max(0, r.prompt_tokens - c) // bs)
                    for r, c in zip(workload.requests, dec.cached_tokens, strict=True)]
    floor = latency_floor(workload, pre, prefill_nodes, settings.prefill_tokens_per_s)
    ttft = sorted(t + b * transfer_s_per_block
                  for t, b in zip(floor.ttft_s, lru_transfer, strict=True))
    p50, p90 = np.percentile(np.array(ttft) * 1000.0, [50, 90]) if ttft else (math.nan,) * 2
    return {"prefill_merged_lru_hit_rate": round(pre.hit_rate_tokens, 4),
            "merged_lru_transfer_blocks": sum(lru_transfer),
            "ttft_floor_ms": {"p50": round(float(p50), 1), "p90": round(float(p90), 1)}}


def run_strategies(workload: Workload, settings: SimSettings, prefill_nodes: int,
                   decode_nodes: int, transfer_s_per_block: float, kv: KvAwareSettings,
                   disagg: DisaggSettings, strategies: list[str], seed: int = 0,
                   progress: Callable[[int], None] | None = None,
                   timing: RequestTiming | None = None) -> list[dict[str, Any]]:
    """Each strategy (``PREFILL/DECODE``; ``PREFILL`` alone: the decode choice of
    ``disagg.pd_decode_policy``) on a fresh P+D fleet: its :func:`pd_metrics`, named
    ``pd:PREFILL/DECODE``; ``timing``: a stack run's measured prefill engine arrivals, replayed
    (:func:`bench.sim.pd_replay.simulate_pd`)."""
    rate = settings.prefill_tokens_per_s
    results: list[dict[str, Any]] = []
    for strat in strategies:
        name = strategy_name(strat, disagg)
        pre_name, _, dec_name = name.partition("/")
        policy = build_policy(pre_name, prefill_tokens_per_s=rate, seed=seed,
                              overrides={KvAwareSettings: kv})
        d = dataclasses.replace(disagg, pd_decode_policy=dec_name)
        pd = simulate_pd(workload, policy, settings, prefill_nodes, decode_nodes,
                         transfer_s_per_block, d, progress, kv.kv_prefill_tokens_per_s,
                         label=f"pd:{name}", seed=seed, timing=timing)
        results.append(pd_metrics(pd))
    return results


def run_pd(workload: Workload, settings: SimSettings, prefill_nodes: int, decode_nodes: int,
           transfer_s_per_block: float, kv: KvAwareSettings, disagg: DisaggSettings,
           strategies: list[str], seed: int = 0,
           progress: Callable[[int], None] | None = None,
           timing: RequestTiming | None = None) -> dict[str, Any]:
    """Every strategy on a fresh P+D fleet, the aggregated run of the same size, the bounds
    (``timing``: :func:`run_strategies`; not replayed in the aggregated run)."""
    rate = settings.prefill_tokens_per_s
    results = run_strategies(workload, settings, prefill_nodes, decode_nodes,
                             transfer_s_per_block, kv, disagg, strategies, seed, progress,
                             timing)
    agg_settings = dataclasses.replace(settings, nodes=prefill_nodes + decode_nodes)
    agg = simulate(workload, build_policy("kv_aware", prefill_tokens_per_s=rate, seed=seed,
                                          overrides={KvAwareSettings: kv}),
                   agg_settings, progress, kv.kv_prefill_tokens_per_s)
    agg_m = policy_metrics(agg, 0.0, 0.0)
    agg_m["policy"] = f"aggregated:kv_aware x{prefill_nodes + decode_nodes}"
    return {"workload": workload.name, "requests": len(workload.requests),
            "prefill_nodes": prefill_nodes, "decode_nodes": decode_nodes,
            "cache_blocks_per_node": settings.cache_blocks, "block_size": settings.block_size,
            "transfer_s_per_block": transfer_s_per_block,
            "disagg_settings": dataclasses.asdict(disagg),
            "bounds": pd_bounds(workload, settings, prefill_nodes, decode_nodes,
                                transfer_s_per_block),
            "results": results, "aggregated": agg_m}


def strategy_name(strategy: str, disagg: DisaggSettings) -> str:
    """``strategy`` as its rows are named: ``PREFILL/DECODE`` (``PREFILL`` alone decodes by
    ``disagg.pd_decode_policy``, as :func:`run_strategies` runs it)."""
    pre, _, dec = strategy.partition("/")
    return f"{pre}/{dec or disagg.pd_decode_policy}"


def pd_agreement(stack_rows: list[dict[str, Any]], workload: Workload, settings: SimSettings,
                 prefill_nodes: int, decode_nodes: int, transfer_s_per_block: float,
                 kv: KvAwareSettings, disagg: DisaggSettings, strategies: list[str],
                 time_scale: float, heartbeat_interval_s: float, runs: int, seed: int = 0,
                 timings: dict[str, RequestTiming] | None = None) -> dict[str, Any]:
    """``--mode stack --sim-runs N`` for disaggregated runs, and ``kvroute demo``'s
    disaggregated row: the stack rows of the router's own strategies (``stack-pd:P/D``)
    against the median of ``runs`` seeded sim replays (seeds ``seed``, ``seed + 1``, ...) under
    the timing the stack measured (:mod:`bench.agreement`): the heartbeat interval, the return
    lag of the prefill half (its engine's answer to the router acknowledging the release) as
    ``complete_lag_s``, and the arrivals at the prefill engines — a uniform jitter of twice the
    median arrival lag (the bench's ``--sim-runs``), or, for a strategy ``timings`` has
    (``P/D`` -> :class:`RequestTiming`: the demo's), each request's measured arrival, decided
    at a seeded point before it (JSON ``request_timing_replayed``)."""
    from bench.agreement import agreement, stack_timing, timed_settings

    own = [dict(r, policy=r["policy"].removeprefix("stack-pd:")) for r in stack_rows
           if r["policy"].startswith("stack-pd:")]
    timing = stack_timing({"results": own}, time_scale, heartbeat_interval_s)
    timed = timed_settings(settings, timing)
    per_request = timings or {}
    names = {strategy_name(s, disagg) for s in strategies}
    replayed = sorted(names & per_request.keys())
    sims = []
    for k in range(runs):
        rows: list[dict[str, Any]] = []
        for strat in strategies:
            lags = per_request.get(strategy_name(strat, disagg))
            at = timed if lags is None else dataclasses.replace(timed, arrival_jitter_s=0.0)
            rows += run_strategies(workload, at, prefill_nodes, decode_nodes,
                                   transfer_s_per_block, kv, disagg, [strat], seed + k,
                                   timing=lags)
        sims.append({"results": [dict(r, policy=r["policy"].removeprefix("pd:"))
                                 for r in rows]})
    if replayed and len(replayed) == len(names):
        timing["arrival_jitter_s"] = 0.0  # replaced by the measured arrivals
    return {"sim_timing": timing, "request_timing_replayed": replayed,
            "agreement": agreement({"results": own}, sims), "sim_runs": sims}


def print_pd(report: dict[str, Any]) -> None:
    """The comparison table."""
    b = report.get("bounds")
    print(f"disaggregated{' (' + report['mode'] + ')' if 'mode' in report else ''}: "
          f"{report['workload']}, {report['requests']} requests, "
          f"{report['prefill_nodes']} prefill + {report['decode_nodes']} decode engines, "
          f"{report['cache_blocks_per_node']} blocks each, transfer "
          f"{report['transfer_s_per_block'] * 1000:g} ms/block")
    print(f"{'strategy':<28}{'hit':>7}{'TTFT p50':>10}{'p90':>9}{'queue':>8}{'prefill':>9}"
          f"{'xfer':>7}{'xfer blk':>10}{'dec held':>9}{'fail':>6}")
    rows = report["results"] + ([report["aggregated"]] if "aggregated" in report else [])
    for m in rows:
        sp = m.get("ttft_split_ms")
        split = (f"{sp['queue']['mean']:8.0f}{sp['prefill']['mean']:9.0f}"
                 f"{sp['transfer']['mean']:7.1f}" if sp else f"{'':8}{'':9}{'':7}")
        xfer = m.get("transferred_blocks")
        held = m.get("decode_held_rate_tokens")
        print(f"{m['policy']:<28}{m['hit_rate_tokens']:7.3f}{m['ttft_ms']['p50']:10.0f}"
              f"{m['ttft_ms']['p90']:9.0f}{split}"
              f"{xfer if xfer is not None else '':>10}"
              f"{f'{held:.3f}' if held is not None else '':>9}{m['failed']:>6}")
    if b is not None:
        print(f"{'oracle (merged LRU, floor)':<28}{b['prefill_merged_lru_hit_rate']:7.3f}"
              f"{b['ttft_floor_ms']['p50']:10.0f}{b['ttft_floor_ms']['p90']:9.0f}{'':24}"
              f"{b['merged_lru_transfer_blocks']:>10}")
    lags = [f"{m['policy']} {lag['p50'] / 1000:.2f}/{lag['p99'] / 1000:.2f}"
            for m in report["results"] if (lag := m.get("arrival_lag_ms"))]
    if lags:
        print("arrival lag at the prefill engines p50/p99 (model s; large = the machine could "
              "not keep the compressed schedule): " + ", ".join(lags))
    print("(queue/prefill/xfer: mean ms of the TTFT split; hit: prompt tokens the prefill "
          "engines' caches served; dec held: prompt tokens the decode engine already held)")


def write_json(report: dict[str, Any], path: str) -> None:
    """Write the report."""
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
