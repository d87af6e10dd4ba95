"""PNG plots of a comparison (matplotlib, headless). See bench/README.md for how to read them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.runner import BenchOutcome


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_POLICY_COLORS = {
    "kv_aware": "#1f77b4", "session": "#ff7f0e", "round_robin": "#2ca02c",
    "least_loaded": "#d62728", "random": "#9467bd", "seed": "#8c564b", "dynamo": "#e377c2",
    "sglang": "#bcbd22", "llmd": "#17becf",
}
_EXTRA = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d"]


def _colors_for(names: Sequence[str]) -> list[str]:
    """A fixed colour per policy name, so every plot of every run agrees."""
    out: list[str] = []
    k = 0
    for n in names:
        c = _POLICY_COLORS.get(n)
        if c is None:
            c = _EXTRA[k % len(_EXTRA)]
            k += 1
        out.append(c)
    return out


def _colors(n: int) -> list[Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _style(name: str) -> dict[str, Any]:
    if name == "kv_aware":
        return {"linewidth": 2.6, "zorder": 5}
    return {"linewidth": 1.3}


def running_hit_rate(out: BenchOutcome, path: Path) -> None:
    """Cumulative engine-measured token hit rate per policy over the trace, with the bounds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(12, 5.5))
    prompt = np.cumsum([r.prompt_tokens for r in out.workload.requests], dtype=float)
    x = np.arange(1, len(prompt) + 1)
    for bound, label, style in ((out.oracle, "oracle (one infinite cache)", "k--"),
                                (out.merged, "merged-capacity LRU", "--")):
        ax.plot(x, np.cumsum(bound.cached_tokens) / prompt, linestyle="--",
                color="0.1" if style == "k--" else "0.55", linewidth=1.5, label=label)
    for run, color in zip(out.runs, _colors_for([r.policy for r in out.runs]), strict=True):
        served_prompt = np.cumsum([p if n >= 0 else 0 for p, n in
                                   zip(run.prompt_tokens, run.node, strict=True)], dtype=float)
        cached = np.cumsum(run.cached_tokens, dtype=float)
        ax.plot(x, cached / np.maximum(served_prompt, 1), color=color, label=run.policy,
                **_style(run.policy))
    ax.set_xlabel("requests replayed (arrival order)")
    ax.set_ylabel("cumulative token hit rate (engine-measured)")
    ax.set_title(f"Running hit rate — {out.workload.name}, {out.settings.nodes} nodes x "
                 f"{out.settings.cache_blocks} blocks")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ttft_cdf(out: BenchOutcome, path: Path) -> None:
    """CDF of time to first token per policy (log time axis)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for run, color in zip(out.runs, _colors_for([r.policy for r in out.runs]), strict=True):
        t = np.sort(np.array([v for v in run.ttft_s if not math.isnan(v)], dtype=float))
        if t.size == 0:
            continue
        y = np.arange(1, t.size + 1) / t.size
        ax.plot(np.maximum(t, 1e-2), y, color=color, label=run.policy, **_style(run.policy))
    if out.floor is not None and out.floor.ttft_s:
        t = np.sort(np.array(out.floor.ttft_s, dtype=float))
        ax.plot(np.maximum(t, 1e-2), np.arange(1, t.size + 1) / t.size, "k--", linewidth=1.4,
                label="latency floor (one shared queue, merged-LRU hits)")
    ax.set_xscale("log")
    ax.set_xlim(left=1e-2)
    ax.axhline(0.9, color="0.6", linewidth=0.8, linestyle=":")
    ax.text(ax.get_xlim()[0], 0.905, " p90", color="0.4", fontsize=8)
    ax.set_xlabel("time to first token (s, log scale; fully cached prompts shown at 0.01 s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF — {out.workload.name} ({out.settings.latency_model} latency model)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(a: Any, k: int) -> Any:
    if k <= 1 or a.shape[0] < k:
        return a
    kernel = np.ones(k) / k
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="same"), 0, a)


def node_load(out: BenchOutcome, path: Path) -> None:
    """In-flight requests per node over time (moving average), one panel per policy."""
    plt = _plt()
    runs = out.runs
    cols = 3
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.8 * rows), sharex=True, sharey=False,
                             squeeze=False)
    colors = _colors(out.settings.nodes)
    for ax, run in zip(axes.flat, runs, strict=False):
        title = run.policy
        if run.load_samples:
            t = np.array([s[0] for s in run.load_samples]) / 60.0
            raw = np.array([s[1] for s in run.load_samples], dtype=float)
            loads = _smooth(raw, 9)
            ax.fill_between(t, loads.min(axis=1), loads.max(axis=1), color="0.85",
                            label="min..max node")
            for j in range(loads.shape[1]):
                ax.plot(t, loads[:, j], color=colors[j], linewidth=0.7, alpha=0.8)
            ax.plot(t, loads.mean(axis=1), color="k", linewidth=1.4, linestyle="--")
            ratio = raw.max(axis=1).mean() / max(1e-9, raw.mean())
            title = f"{run.policy} (busiest node / mean, averaged: {ratio:.2f})"
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("in flight")
    for ax in axes[-1, :]:
        ax.set_xlabel("trace time (min)")
    fig.suptitle("Per-node in-flight requests over time (moving average; one line per node, grey "
                 "band = min..max node, dashed = fleet mean; own y scale per panel)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def predicted_vs_actual(out: BenchOutcome, path: Path) -> None:
    """Router-predicted vs engine-measured token hit rate per policy."""
    plt = _plt()
    res = out.report["results"]
    names = [r["policy"] for r in res]
    pred = [r["predicted_hit_rate_tokens"] for r in res]
    act = [r["hit_rate_tokens"] for r in res]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.bar(x - 0.2, pred, 0.4, label="predicted by the router (registry belief at routing)",
           color="#9ecae1")
    ax.bar(x + 0.2, act, 0.4, label="served by the engine cache (measured)", color="#08519c")
    ax.axhline(out.oracle.hit_rate_tokens, color="k", linestyle="--", linewidth=1,
               label="oracle")
    ax.axhline(out.merged.hit_rate_tokens, color="0.5", linestyle="--", linewidth=1,
               label="merged-capacity LRU")
    for xi, p_, a_ in zip(x, pred, act, strict=True):
        ax.text(xi - 0.2, p_, f"{p_:.3f}", ha="center", va="bottom", fontsize=7)
        ax.text(xi + 0.2, a_, f"{a_:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("token hit rate")
    ax.set_ylim(0, max([*pred, *act, out.oracle.hit_rate_tokens]) * 1.25)
    ax.set_title("Predicted vs actual cached tokens (a gap = the router's belief was stale, or "
                 "blocks were evicted or added while the request queued)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out: BenchOutcome, plot_dir: str | Path) -> list[Path]:
    """Write every comparison plot into ``plot_dir``; returns the paths."""
    d = Path(plot_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / "hit_rate_running.png", d / "ttft_cdf.png", d / "node_load.png",
             d / "predicted_vs_actual.png"]
    running_hit_rate(out, paths[0])
    ttft_cdf(out, paths[1])
    node_load(out, paths[2])
    predicted_vs_actual(out, paths[3])
    return paths


def sweep_plot(sweep: dict[str, Any], path: Path) -> None:
    """Hit rate vs per-node cache capacity, per policy, with the bounds."""
    plt = _plt()
    caps: Sequence[int] = sweep["cache_blocks"]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    ax.plot(caps, [sweep["oracle"]] * len(caps), "k--", linewidth=1.4, label="oracle")
    ax.plot(caps, sweep["merged_lru"], "--", color="0.5", marker="s", linewidth=1.4,
            label="merged-capacity LRU")
    names = list(sweep["policies"])
    for name, color in zip(names, _colors_for(names), strict=True):
        ax.plot(caps, sweep["policies"][name], marker="o", color=color, label=name,
                **_style(name))
    ax.set_xscale("log")
    ax.set_xlabel("KV cache per node (blocks, log scale)")
    ax.set_ylabel("token hit rate (engine-measured)")
    ax.set_xticks(list(caps), [str(c) for c in caps])
    ax.minorticks_off()
    ax.set_title(f"Hit rate vs cache capacity — {sweep['workload']}, {sweep['nodes']} nodes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
