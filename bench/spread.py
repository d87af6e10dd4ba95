"""Run-to-run spread of repeated comparisons (``kvroute bench --mode stack --repeat N``).

The stack replays through real processes on the wall clock, so two runs of the same command
differ; the bench measures by how much instead of asserting it. For every policy present in
every run: its hit rate and TTFT percentiles per run, the hit-rate spread (max - min) and each
TTFT percentile's relative spread ((max - min) / min).

Runs whose replay was contention-bound (:mod:`bench.contention`: arrival lag p99 over the
threshold, the same rule for every router) are marked, never dropped: ``within_target`` is over
every run; ``contended_runs`` lists the marked ones (1-based) and, when at least two runs are
left, ``within_target_uncontended`` is the same check over the others only.

Where the runs part ways: given each run's decisions (the node per request),
``diverge_at`` is the first request (0-based, in arrival order) that a later run sent to a
different node than run 1, with nodes named by first use (the fleet's engines start identical
and empty, so two runs that only relabel them agree); ``same_decisions`` is the share of
requests routed alike. Both runs replay the same requests in the same order on the same
engines, so a router whose runs diverge within the first few requests, before any load builds
up, decides by something other than its inputs (a random tie-break, a race with its own
event feed) — the spread that follows is its own, not the harness's.
"""

from __future__ import annotations

from typing import Any

HIT_SPREAD_TARGET = 0.005
"""Issue 12: two back-to-back runs agree within this much token hit rate..."""
TTFT_SPREAD_TARGET = 0.05
"""...and within this relative difference of p90 TTFT."""


def first_use_labels(nodes: list[int]) -> list[int]:
    """``nodes`` renamed by order of first use (failed requests, ``-1``, stay ``-1``)."""
    names: dict[int, int] = {}
    return [n if n < 0 else names.setdefault(n, len(names)) for n in nodes]


def divergence(runs: list[list[int]]) -> dict[str, Any]:
    """``{"diverge_at", "same_decisions"}`` of runs 2.. against run 1 (node per request, nodes
    named by first use); ``diverge_at`` None when every run decided exactly like run 1."""
    if len(runs) < 2 or not runs[0]:
        return {"diverge_at": None, "same_decisions": None}
    base = first_use_labels(runs[0])
    first: int | None = None
    same: list[float] = []
    for other in runs[1:]:
        lab = first_use_labels(other)
        k = next((i for i, (a, b) in enumerate(zip(base, lab, strict=False)) if a != b), None)
        if k is not None and (first is None or k < first):
            first = k
        same.append(sum(a == b for a, b in zip(base, lab, strict=False)) / len(base))
    return {"diverge_at": first, "same_decisions": round(min(same), 4)}


def rows_in_every_run(runs: list[list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per ``policy`` present in every run (in run 1's order): its row of each run."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in (r["policy"] for r in runs[0]) if runs else ():
        rows = [next((r for r in run if r["policy"] == name), None) for run in runs]
        found = [r for r in rows if r is not None]
        if len(found) == len(runs):
            out[name] = found
    return out


def spread(reports: list[dict[str, Any]],
           decisions: list[dict[str, list[int]]] | None = None) -> dict[str, dict[str, Any]]:
    """Per policy: values per run and their spread (policies missing from a run are skipped);
    with ``decisions`` (per run: policy → node per request) also where the runs diverge."""
    out: dict[str, dict[str, Any]] = {}
    for name, rows in rows_in_every_run([rep["results"] for rep in reports]).items():
        hits = [r["hit_rate_tokens"] for r in rows]
        entry: dict[str, Any] = {"hit_rate_tokens": hits,
                                 "hit_spread": round(max(hits) - min(hits), 4)}
        for q in ("p50", "p90", "p99"):
            vals = [r["ttft_ms"][q] for r in rows]
            entry[f"ttft_{q}_ms"] = vals
            entry[f"ttft_{q}_spread"] = round((max(vals) - min(vals)) / min(vals), 4) \
                if min(vals) > 0 else None
        entry["within_target"] = _met(rows)
        contended = [k for k, r in enumerate(rows, 1) if r.get("contention_bound")]
        entry["contended_runs"] = contended
        clean = [r for k, r in enumerate(rows, 1) if k not in contended]
        entry["within_target_uncontended"] = _met(clean) if contended and len(clean) >= 2 \
            else None
        if decisions is not None and all(name in d for d in decisions):
            entry.update(divergence([d[name] for d in decisions]))
        out[name] = entry
    return out


def _met(rows: list[dict[str, Any]]) -> bool:
    hits = [float(r["hit_rate_tokens"]) for r in rows]
    p90 = [float(r["ttft_ms"]["p90"]) for r in rows]
    return max(hits) - min(hits) <= HIT_SPREAD_TARGET and min(p90) > 0 and \
        (max(p90) - min(p90)) / min(p90) <= TTFT_SPREAD_TARGET


def format_spread(table: dict[str, dict[str, Any]]) -> str:
    """The spread as a terminal table."""
    if not table:
        return ""
    runs = len(next(iter(table.values()))["hit_rate_tokens"])
    w = max(12, *(len(n) + 1 for n in table))
    lines = [f"run-to-run spread over {runs} runs (targets: hit <= {HIT_SPREAD_TARGET}, "
             f"p90 TTFT <= {TTFT_SPREAD_TARGET:.0%}):",
             f"{'policy':<{w}}{'hit per run':>22}{'spread':>8}{'p90 TTFT per run (s)':>26}"
             f"{'spread':>8}{'p50 spr':>8}{'p99 spr':>8}{'diverge@':>9}{'same':>6}  met"]
    for name, e in table.items():
        hits = " ".join(f"{h:.3f}" for h in e["hit_rate_tokens"])
        p90 = " ".join(f"{v / 1000:.2f}" for v in e["ttft_p90_ms"])
        marked = e.get("contended_runs") or []
        note = ""
        if marked:
            clean = e.get("within_target_uncontended")
            note = (f"  (contention-bound: run {', '.join(map(str, marked))}"
                    + ("" if clean is None else
                       f"; the other runs: {'yes' if clean else 'NO'}") + ")")
        lines.append(f"{name:<{w}}{hits:>22}{e['hit_spread']:8.3f}{p90:>26}"
                     f"{_pct(e['ttft_p90_spread'])}{_pct(e['ttft_p50_spread'])}"
                     f"{_pct(e['ttft_p99_spread'])}{_diverge(e)}"
                     f"  {'yes' if e['within_target'] else 'NO'}"
                     + note)
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return f"{'-':>8}" if v is None else f"{v:8.1%}"


def _diverge(e: dict[str, Any]) -> str:
    if e.get("same_decisions") is None:
        return f"{'-':>9}{'-':>6}"
    at = e.get("diverge_at")
    return f"{'never' if at is None else at:>9}{e['same_decisions']:6.0%}"
