"""Run-to-run spread of repeated comparisons (``kvroute bench --mode stack --repeat N``).

The stack replays through real processes on the wall clock, so two runs of the same command
differ; the bench measures by how much instead of asserting it. For every policy present in
every run: its hit rate and TTFT percentiles per run, the hit-rate spread (max - min) and each
TTFT percentile's relative spread ((max - min) / min).
"""

from __future__ import annotations

from typing import Any

HIT_SPREAD_TARGET = 0.005
"""Issue 12: two back-to-back runs agree within this much token hit rate..."""
TTFT_SPREAD_TARGET = 0.05
"""...and within this relative difference of p90 TTFT."""


def spread(reports: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per policy: values per run and their spread (policies missing from a run are skipped)."""
    if not reports:
        return {}
    names = [r["policy"] for r in reports[0]["results"]]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [next((r for r in rep["results"] if r["policy"] == name), None)
                for rep in reports]
        if any(r is None for r in rows):
            continue
        hits = [r["hit_rate_tokens"] for r in rows if r is not None]
        entry: dict[str, Any] = {"hit_rate_tokens": hits,
                                 "hit_spread": round(max(hits) - min(hits), 4)}
        for q in ("p50", "p90", "p99"):
            vals = [r["ttft_ms"][q] for r in rows if r is not None]
            entry[f"ttft_{q}_ms"] = vals
            entry[f"ttft_{q}_spread"] = round((max(vals) - min(vals)) / min(vals), 4) \
                if min(vals) > 0 else None
        entry["within_target"] = entry["hit_spread"] <= HIT_SPREAD_TARGET and \
            entry["ttft_p90_spread"] is not None and entry["ttft_p90_spread"] <= TTFT_SPREAD_TARGET
        out[name] = entry
    return out


def format_spread(table: dict[str, dict[str, Any]]) -> str:
    """The spread as a terminal table."""
    if not table:
        return ""
    runs = len(next(iter(table.values()))["hit_rate_tokens"])
    w = max(12, *(len(n) + 1 for n in table))
    lines = [f"run-to-run spread over {runs} runs (targets: hit <= {HIT_SPREAD_TARGET}, "
             f"p90 TTFT <= {TTFT_SPREAD_TARGET:.0%}):",
             f"{'policy':<{w}}{'hit per run':>22}{'spread':>8}{'p90 TTFT per run (s)':>26}"
             f"{'spread':>8}{'p50 spr':>8}{'p99 spr':>8}  met"]
    for name, e in table.items():
        hits = " ".join(f"{h:.3f}" for h in e["hit_rate_tokens"])
        p90 = " ".join(f"{v / 1000:.2f}" for v in e["ttft_p90_ms"])
        lines.append(f"{name:<{w}}{hits:>22}{e['hit_spread']:8.3f}{p90:>26}"
                     f"{_pct(e['ttft_p90_spread'])}{_pct(e['ttft_p50_spread'])}"
                     f"{_pct(e['ttft_p99_spread'])}  {'yes' if e['within_target'] else 'NO'}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return f"{'-':>8}" if v is None else f"{v:8.1%}"
