"""``kvroute bench --prefill-nodes P --decode-nodes D --repeat N``: a disaggregated comparison
as a mean and a spread instead of one draw.

``--mode stack``: N independent replays, each on a freshly started fleet (P + D engine_sim
with agents, registry, router, etcd, and every ``--pd-peers`` router in front of the same
engines); ``--mode sim``: the strategies replayed with seeds ``--seed`` .. ``--seed + N - 1``.
Every row present in every run (kvroute's strategies and the peers; the stack's ``sim:`` rows
are one exact-schedule replay and are left out) gets, over the runs, the mean, sample standard
deviation, minimum and maximum of its hit rate (prefill side), TTFT p50 and p90 and transferred
blocks, the mean decode-held fraction, the stack's arrival lag p99 at the prefill engines (the
replay's contention check: a run whose lag is large could not keep the compressed schedule),
and each run's values (JSON ``repeats``; ``null`` where a run has no value). Runs whose replay
was contention-bound by the bench's own rule (:func:`bench.contention.contention_bound`, the
one the aggregated ``--repeat`` spread applies) are listed per row (``contended_runs``,
1-based) and marked in the table, never dropped.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from bench.contention import CONTENTION_LAG_P99_S, contention_bound
from bench.spread import rows_in_every_run

METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hit_rate_tokens", ("hit_rate_tokens",)),
    ("ttft_p50_ms", ("ttft_ms", "p50")),
    ("ttft_p90_ms", ("ttft_ms", "p90")),
    ("transferred_blocks", ("transferred_blocks",)),
    ("decode_held_rate_tokens", ("decode_held_rate_tokens",)),
    ("arrival_lag_p99_ms", ("arrival_lag_ms", "p99")),
)
"""Summarised metrics: JSON name and where each row keeps it."""


def _value(row: dict[str, Any], path: tuple[str, ...]) -> float:
    v: Any = row
    for key in path:
        if not isinstance(v, dict) or key not in v:
            return math.nan
        v = v[key]
    return float(v) if isinstance(v, int | float) else math.nan


def stats(xs: list[float]) -> dict[str, Any]:
    """``{n, mean, sd, min, max}`` of the finite values of ``xs`` (NaN = no value; ``n`` counts
    the finite ones): None where there are none, ``sd`` None below two (sample sd)."""
    ok = [x for x in xs if not math.isnan(x)]
    if not ok:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {"n": len(ok), "mean": round(statistics.fmean(ok), 4),
            "sd": round(statistics.stdev(ok), 4) if len(ok) > 1 else None,
            "min": round(min(ok), 4), "max": round(max(ok), 4)}


def summarize(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """``{"runs": N, "rows": {policy: {metric: {n, mean, sd, min, max, per_run},
    "contended_runs": [k, ...]}}}`` over the rows (``pd_metrics`` dicts, by ``policy``) present
    in every run, in run 1's order; ``sim:`` rows are left out; ``per_run`` holds None (JSON
    ``null``) where a run has no value."""
    rows: dict[str, Any] = {}
    common = rows_in_every_run(runs)
    for name, found in common.items():
        if name.startswith("sim:"):
            continue
        rows[name] = {key: _summary([_value(r, path) for r in found]) for key, path in METRICS}
        rows[name]["contended_runs"] = [k for k, r in enumerate(found, 1)
                                        if contention_bound(r)]
    return {"runs": len(runs), "rows": rows}


def _summary(xs: list[float]) -> dict[str, Any]:
    return {**stats(xs), "per_run": [None if math.isnan(x) else x for x in xs]}


def _cell(s: dict[str, Any], fmt: str, scale: float = 1.0) -> str:
    if s["mean"] is None:
        return "-"
    f = f"{{:{fmt}}}"
    sd = "-" if s["sd"] is None else f.format(s["sd"] * scale)
    return (f"{f.format(s['mean'] * scale)} ±{sd} "
            f"[{f.format(s['min'] * scale)}..{f.format(s['max'] * scale)}]")


def format_repeats(summary: dict[str, Any]) -> str:
    """The summary as a terminal table (mean ±sd [min..max] over the runs)."""
    rows = summary.get("rows") or {}
    if not rows:
        return ""
    w = max(28, *(len(n) + 2 for n in rows))
    lines = [f"over {summary['runs']} runs: mean ±sd [min..max] (TTFT in s; lag p99 max: "
             f"the worst run's arrival lag p99 at the prefill engines, s; * = contention-bound "
             f"runs, arrival lag p99 > {CONTENTION_LAG_P99_S:g} s: their figures are indicative)",
             f"{'row':<{w}}{'hit':>34}  {'p50':>6}  {'p90':>26}  {'xfer blocks':>30}"
             f"  {'dec held':>8}  {'lag p99 max':>11}"]
    for name, m in rows.items():
        p50 = m["ttft_p50_ms"]["mean"]
        held = m["decode_held_rate_tokens"]["mean"]
        lag = m["arrival_lag_p99_ms"]["max"]
        lines.append(f"{name:<{w}}{_cell(m['hit_rate_tokens'], '.4f'):>34}"
                     f"  {'-' if p50 is None else f'{p50 / 1000:.2f}':>6}"
                     f"  {_cell(m['ttft_p90_ms'], '.2f', 0.001):>26}"
                     f"  {_cell(m['transferred_blocks'], ',.0f'):>30}"
                     f"  {'-' if held is None else f'{held:.3f}':>8}"
                     f"  {'-' if lag is None else f'{lag / 1000:.2f}':>11}"
                     + _contended(m.get("contended_runs") or []))
    return "\n".join(lines)


def _contended(runs: list[int]) -> str:
    return f"  * run {', '.join(map(str, runs))} contention-bound" if runs else ""
