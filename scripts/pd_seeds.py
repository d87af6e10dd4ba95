"""Seeded disaggregated sim replays, summarised per strategy (JSON lines on stdout).

    python scripts/pd_seeds.py [--workload mooncake-sample | --trace PATH]
        [--strategies kv_aware/kv_aware,vllm_pd/least_loaded,...] [--seeds 30] [--first-seed 0]
        [--arrival-jitter-s 2.7] [--heartbeat-delay-s 1.0] [--complete-lag-s 0] [--prefill-nodes 6]
        [--decode-nodes 2] [--kv FIELD=VALUE ...] [--reference vllm_pd/least_loaded]
        [--blocks-reference round_robin/round_robin]

Each seed is one ``kvroute bench --mode sim --prefill-nodes P --decode-nodes D --seed S``
replay of every strategy (:func:`bench.pd_bench.run_strategies`, the CLI's code) under the
given timing; a generated workload (``conversations``, ``system-prompt``) is drawn with the
run's seed, as the README's tables do. The fleet's per-node cache is sized for P + D nodes
(as the CLI does), so splits of the same total compare at the same per-node capacity. One
JSON line per strategy: hit rate (prefill side), TTFT p90 and transferred blocks as mean, sd,
min and max over the seeds, p50 and the decode-held fraction as means; against
``--reference``, the paired difference of hit (mean, sd, min, max) and the mean paired
difference of p90, and the seeds where the strategy's hit is at least the reference's; against
``--blocks-reference``, the paired difference of transferred blocks and the seeds where the
strategy moved fewer (a reference missing from ``--strategies`` is added to the run, with a
note on stderr); ``per_seed`` lists each seed's hit, p90 and blocks (to pair runs of
different settings). ``--kv FIELD=VALUE`` overrides a
:class:`router_service.policies.kv_aware.KvAwareSettings` field for the kv_aware rows (a what-if;
the CLI's ``--kv-...`` flags are the same fields). An analysis tool for issue 18 (README,
"Disaggregated prefill/decode"), not a benchmark: the sim runs on a virtual clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from typing import Any

from bench.pd_bench import run_strategies
from bench.pd_repeats import stats
from bench.runner import resolve_settings
from bench.sim.config import SimSettings
from bench.workloads import load_workload
from engine_sim.params import transfer_s_per_block
from router_service.disagg import DisaggSettings
from router_service.policies.kv_aware import KvAwareSettings


def _kv_overrides(pairs: list[str]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(KvAwareSettings)}
    out: dict[str, Any] = {}
    for pair in pairs:
        name, _, raw = pair.partition("=")
        if name not in fields:
            raise SystemExit(f"--kv: no KvAwareSettings field {name!r}")
        kind = type(getattr(KvAwareSettings(), name))
        out[name] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mooncake-sample")
    p.add_argument("--trace", default=None)
    p.add_argument("--strategies", default="kv_aware/kv_aware,vllm_pd/least_loaded,"
                                            "sglang/least_loaded")
    p.add_argument("--reference", default="vllm_pd/least_loaded",
                   help="strategy the hit and p90 are paired against (added to the run when "
                        "not in --strategies; '' for none)")
    p.add_argument("--blocks-reference", default="round_robin/round_robin",
                   help="strategy the transferred blocks are paired against (added to the run "
                        "when not in --strategies; '' for none)")
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--arrival-jitter-s", type=float, default=2.7)
    p.add_argument("--heartbeat-delay-s", type=float, default=1.0)
    p.add_argument("--complete-lag-s", type=float, default=0.0,
                   help="the router hears of each half's end this late, in model seconds "
                        "(a stack run's return_lag_ms p50 / 1000: the proxy's hop and the "
                        "Complete RPC); finite, >= 0")
    p.add_argument("--prefill-nodes", type=int, default=6)
    p.add_argument("--decode-nodes", type=int, default=2)
    p.add_argument("--kv", action="append", default=[], metavar="FIELD=VALUE")
    args = p.parse_args()
    if not (math.isfinite(args.complete_lag_s) and args.complete_lag_s >= 0):
        p.error(f"--complete-lag-s: model seconds, finite and >= 0, not {args.complete_lag_s}")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for flag, ref_name in (("--reference", args.reference),
                           ("--blocks-reference", args.blocks_reference)):
        if ref_name and ref_name not in strategies:
            strategies.append(ref_name)
            print(f"pd_seeds.py: {flag} {ref_name} is not in --strategies: added to the run",
                  file=sys.stderr, flush=True)
    pn, dn = args.prefill_nodes, args.decode_nodes
    overrides = _kv_overrides(args.kv)
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        w = load_workload(trace=args.trace, workload=args.workload, seed=seed)
        s = resolve_settings(w, SimSettings(nodes=pn + dn, arrival_jitter_s=args.arrival_jitter_s,
                                            heartbeat_delay_s=args.heartbeat_delay_s,
                                            complete_lag_s=args.complete_lag_s))
        bs = s.block_size or w.block_size
        xfer = transfer_s_per_block("seed", bs)
        kv = dataclasses.replace(KvAwareSettings(kv_prefill_tokens_per_s=s.prefill_tokens_per_s),
                                 **overrides)
        out = run_strategies(w, s, pn, dn, xfer, kv,
                             DisaggSettings(pd_transfer_s_per_block=xfer), strategies, seed)
        for strat, m in zip(strategies, out, strict=True):
            rows[strat].append(m)
    ref = rows.get(args.reference)
    for strat, ms in rows.items():
        hit = [m["hit_rate_tokens"] for m in ms]
        p90 = [m["ttft_ms"]["p90"] / 1000 for m in ms]
        blocks = [float(m["transferred_blocks"]) for m in ms]
        line: dict[str, Any] = {
            "strategy": strat, "workload": args.trace or args.workload, "seeds": len(ms),
            "first_seed": args.first_seed, "arrival_jitter_s": args.arrival_jitter_s,
            "heartbeat_delay_s": args.heartbeat_delay_s, "complete_lag_s": args.complete_lag_s,
            "kv": overrides,
            "prefill_nodes": pn, "decode_nodes": dn,
            "hit": stats(hit), "p90_s": stats(p90),
            "p50_s": round(statistics.mean(m["ttft_ms"]["p50"] / 1000 for m in ms), 3),
            "transferred_blocks": stats(blocks),
            "decode_held": round(statistics.mean(m["decode_held_rate_tokens"] for m in ms), 4),
            "per_seed": {"hit": hit, "p90_s": [round(x, 3) for x in p90], "blocks": blocks}}
        if ref is not None and strat != args.reference:
            rh = [m["hit_rate_tokens"] for m in ref]
            rp = [m["ttft_ms"]["p90"] / 1000 for m in ref]
            dh = [a - b for a, b in zip(hit, rh, strict=True)]
            line["vs_reference"] = {
                "reference": args.reference, "hit_diff": stats(dh),
                "p90_diff_mean_s": round(statistics.mean(a - b for a, b in zip(p90, rp,
                                                                               strict=True)), 3),
                "seeds_hit_at_least_reference": sum(a >= b for a, b in zip(hit, rh,
                                                                           strict=True))}
        bref = rows.get(args.blocks_reference)
        if bref is not None and strat != args.blocks_reference:
            db = [a - float(m["transferred_blocks"]) for a, m in zip(blocks, bref, strict=True)]
            line["blocks_vs_reference"] = {
                "reference": args.blocks_reference, "blocks_diff": stats(db),
                "seeds_fewer_blocks": sum(d < 0 for d in db)}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
