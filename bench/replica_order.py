"""The order of ``POLICY`` and ``POLICY@N`` in a stack run, and the replica effect over runs.

``kvroute bench --mode stack --routers N`` replays each policy through one router and spread
over N replicas in the same run. Measured in s26 on one reused fleet: whichever of the two was
replayed second gained about 0.006 hit rate, as much as issue 19's bar. Each replay now starts on
a new fleet (``--fresh-fleet``), and with ``--repeat`` the runs also alternate the order (run 1
as asked, run 2 swapped, ...: ABBA over two runs), so what order is left cancels in the mean.
:func:`replica_effect` gives, per pair, each run's difference (replicas minus one replica), the
order it was replayed in, and the mean over runs (JSON ``replica_effect``).
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any


def _is_pair(a: str, b: str) -> bool:
    """``b`` is ``a`` over replicas (``kv_aware`` / ``kv_aware@4``), or the other way round."""
    return b.startswith(a + "@") or a.startswith(b + "@")


def swap_pairs(names: list[str]) -> list[str]:
    """``names`` with each adjacent ``POLICY`` / ``POLICY@N`` pair in the other order."""
    out: list[str] = []
    i = 0
    while i < len(names):
        if i + 1 < len(names) and _is_pair(names[i], names[i + 1]):
            out += [names[i + 1], names[i]]
            i += 2
        else:
            out.append(names[i])
            i += 1
    return out


def run_order(names: list[str], run: int, alternate: bool) -> list[str]:
    """The replay order of run ``run`` (0-based): as given on even runs, pairs swapped on odd
    runs when ``alternate``."""
    return swap_pairs(names) if alternate and run % 2 == 1 else list(names)


def pairs(names: list[str]) -> list[tuple[str, str]]:
    """(one replica, N replicas) for every adjacent pair in ``names``."""
    out = []
    for a, b in itertools.pairwise(names):
        if _is_pair(a, b):
            out.append((a, b) if b.startswith(a + "@") else (b, a))
    return out


def _rel(a: float, b: float) -> float | None:
    return round(a / b - 1.0, 4) if b > 0 else None


def replica_effect(reports: list[dict[str, Any]], orders: list[list[str]],
                   ) -> dict[str, dict[str, Any]]:
    """Per ``POLICY@N``: per run the hit difference to ``POLICY`` and the relative p90/p99 TTFT
    difference, whether the replicas replayed second, and the means over runs."""
    out: dict[str, dict[str, Any]] = {}
    for one, many in pairs(orders[0]):
        runs = []
        for rep, order in zip(reports, orders, strict=True):
            by = {r["policy"]: r for r in rep["results"]}
            if one not in by or many not in by:
                continue
            a, b = by[one], by[many]
            runs.append({
                "replicas_second": order.index(many) > order.index(one),
                "hit": round(b["hit_rate_tokens"] - a["hit_rate_tokens"], 4),
                "p90": _rel(b["ttft_ms"]["p90"], a["ttft_ms"]["p90"]),
                "p99": _rel(b["ttft_ms"]["p99"], a["ttft_ms"]["p99"])})
        if not runs:
            continue
        mean = {k: round(statistics.fmean(v), 4) if (v := [r[k] for r in runs
                                                            if r[k] is not None]) else None
                for k in ("hit", "p90", "p99")}
        out[many] = {"against": one, "runs": runs, "mean": mean,
                     "balanced": any(r["replicas_second"] for r in runs)
                     and any(not r["replicas_second"] for r in runs)}
    return out


def format_effect(effect: dict[str, dict[str, Any]]) -> str:
    """The replica effect as terminal lines."""
    lines = []
    for many, e in effect.items():
        per = "; ".join(
            f"run {k}: hit {r['hit']:+.4f}, p90 {_pct(r['p90'])}, p99 {_pct(r['p99'])} "
            f"({'replicas second' if r['replicas_second'] else 'replicas first'})"
            for k, r in enumerate(e["runs"], 1))
        m = e["mean"]
        lines.append(f"{many} vs {e['against']}: {per}; mean over {len(e['runs'])} runs: hit "
                     f"{m['hit']:+.4f}, p90 {_pct(m['p90'])}, p99 {_pct(m['p99'])}"
                     f" ({'order balanced' if e['balanced'] else 'ONE ORDER ONLY'})")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1%}"
