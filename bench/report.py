"""The terminal table of a comparison, and writing a comparison's outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.contention import CONTENTION_LAG_P99_S

if TYPE_CHECKING:
    from bench.runner import BenchOutcome


def _s(ms: float, width: int = 9) -> str:
    v = ms / 1000
    return f"{v:{width}.2f}" if v < 1000 else f"{v:{width}.0f}"


def _hit(bound: dict[str, Any]) -> str:
    v = bound.get("hit_rate_tokens")
    return "n/a (not replayed)" if v is None else f"{v:.3f}"


def _floor_line(floor: dict[str, Any] | None) -> str:
    if not floor:
        return "latency floor: n/a (seed latency preset)"
    t = floor["ttft_ms"]
    return (f"latency floor (the same engines behind one shared FIFO queue, merged-LRU hits): "
            f"TTFT p50 {t['p50'] / 1000:.2f}  p90 {t['p90'] / 1000:.2f}  p99 "
            f"{t['p99'] / 1000:.2f} s, util {floor['utilization']:.2f}")


def _ratio(ratios: dict[str, float] | None) -> str:
    if not ratios:
        return f"{'-':>7}"
    return f"{ratios['p90']:7.2f}"


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table: one row per policy, bounds in the header."""
    b = report["bounds"]
    m = report["model"]
    w = max([13, *(len(r["policy"]) + 1 for r in report["results"])])
    lines = [
        f"workload {report['workload']} ({report['requests']} requests, "
        f"{report['distinct_blocks']} distinct blocks of {m['block_size']} tokens), "
        f"{report['nodes']} nodes x {report['cache_blocks']} blocks, mode {report['mode']}, "
        f"latency model {m['latency_model']} (prefill {m['prefill_tokens_per_s']:.0f} tok/s)",
        *([f"arrivals: {report['arrivals']}"] if report.get("arrivals") else []),
        f"bounds: oracle {b['oracle']['hit_rate_tokens']:.3f}   merged-LRU "
        f"{b['merged_lru']['hit_rate_tokens']:.3f}   random {_hit(b['random'])}",
        _floor_line(b.get("latency_floor")),
        "",
        f"{'policy':<{w}}{'hit':>6}{'/orc':>6}{'/mLRU':>6}{'pred':>6}{'req':>6}"
        f"{'TTFT p50':>9}{'p90':>9}{'p99':>9}{'p90/fl':>7}{'e2e p90':>9}{'rps':>6}"
        f"{'max/mean':>9}{'util':>6}{'evict':>9}{'fail':>5}",
    ]
    for r in report["results"]:
        t, e = r["ttft_ms"], r["e2e_ms"]
        lines.append(
            f"{r['policy']:<{w}}{r['hit_rate_tokens']:6.3f}{r['hit_ratio_to_oracle'] or 0:6.2f}"
            f"{r['hit_ratio_to_merged_lru'] or 0:6.2f}{r['predicted_hit_rate_tokens']:6.3f}"
            f"{r['hit_rate_requests']:6.2f}{_s(t['p50'])}{_s(t['p90'])}"
            f"{_s(t['p99'])}{_ratio(r.get('ttft_ratio_to_floor'))}{_s(e['p90'])}"
            f"{r['throughput_rps']:6.2f}"
            f"{r['load_max_over_mean']:9.2f}{r['utilization']:6.2f}{r['evictions']:9d}"
            f"{r['failed']:5d}")
    timed = [r for r in report["results"] if r.get("arrival_lag_ms")]
    if timed:
        lines.append(f"replay timing (model s) — arrival lag at the engines p50/p99, return lag "
                     f"(engine finished -> client had the response) p50; load average at start "
                     f"/ end of the replay, CPU busy; * = contention-bound (arrival lag p99 > "
                     f"{CONTENTION_LAG_P99_S:g} s: the replay could not keep the trace's timing):")
        lines.extend(_timing(r) for r in timed)
    lines.append("")
    lines.append("hit = engine-measured token hit rate; /orc, /mLRU = ratio to the oracle and "
                 "merged-LRU bounds; pred = router-predicted token hit rate; req = requests "
                 ">= 50% cached; TTFT/e2e in seconds; p90/fl = TTFT p90 / the latency floor's; "
                 "max/mean = busiest node's requests / mean")
    return "\n".join(lines)


def _timing(r: dict[str, Any]) -> str:
    lag, ret = r["arrival_lag_ms"], r.get("return_lag_ms")
    load, busy = r.get("load_avg_1m"), r.get("cpu_busy")
    return (f"  {'*' if r.get('contention_bound') else ' '} {r['policy']:<34} arrival "
            f"{lag['p50'] / 1000:5.2f}/{lag['p99'] / 1000:5.2f}"
            + (f"  return {ret['p50'] / 1000:5.2f}" if ret else "")
            + (f"  load {load[0]:.1f}/{load[1]:.1f}" if load else "")
            + (f"  cpu {busy:.0%}" if busy is not None else ""))


def emit(out: BenchOutcome, summary: str, json_path: str | None, plot_dir: str | None) -> None:
    """Print the table and ``summary``; write the JSON report and the plots when asked."""
    print(format_table(out.report))
    print(summary)
    if json_path:
        Path(json_path).write_text(json.dumps(out.report, indent=2) + "\n")
        print(f"JSON: {json_path}")
    if plot_dir:
        from bench.plots import write_all

        for path in write_all(out, plot_dir):
            print(f"plot: {path}")
