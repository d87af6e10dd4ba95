"""``kvroute demo``'s disaggregated run alone, repeatable: stack replay, sims, per-request JSON.

    python scripts/demo_pd.py [--runs N] [--tag T] [--out DIR] [demo flags ...]

Builds the notebook workload, engine settings and P + D fleet exactly as ``kvroute demo`` does
(:mod:`cli.cmd_demo`: the same flags and defaults), replays the workload through the
disaggregated stack's gateway once per run on a fresh fleet, and prints what the demo prints
for it (the table and the agreement with seeded sims under the run's measured timing). Writes
``DIR/pd-TK.json`` per run: the demo's report, the load average before and after, and each
request's prefill and decode node, cached tokens, TTFT and measured prefill engine arrival lag
(model seconds), for per-request diffs. The whole demo takes ~95 s; this ~20 s per run. An
analysis tool for issue 18 (README, "The demo"); take the bench lock for figures you report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _num(x: float | None) -> float | None:
    """A measured value, None (JSON null) where there is none (NaN: a failed request)."""
    return None if x is None or math.isnan(x) else x


def _rows(pd: Any) -> list[dict[str, Any]]:
    run = pd.run
    lags = run.arrival_lag_by_request or [None] * len(run.node)
    return [{"i": i, "lag": _num(lags[i]), "p": run.node[i], "d": pd.decode_node[i],
             "prompt": run.prompt_tokens[i], "cached": run.cached_tokens[i],
             "ttft": _num(run.ttft_s[i]), "queue": _num(pd.queue_s[i]),
             "xfer_blocks": pd.transfer_blocks[i], "held": pd.decode_held_tokens[i]}
            for i in range(len(run.node))]


def main(argv: list[str] | None = None) -> int:
    from cli import cmd_demo
    from kvroute.errors import ConfigError

    top = argparse.ArgumentParser(prog="demo_pd.py")
    sub = top.add_subparsers()
    cmd_demo.add_parser(sub)
    demo = sub.choices["demo"]
    demo.prog = "demo_pd.py"
    demo.description = __doc__.split("\n\n")[0]
    demo.add_argument("--runs", type=int, default=1, metavar="N",
                      help="stack replays, each on a freshly started fleet (default 1)")
    demo.add_argument("--tag", default="", metavar="T",
                      help="prefix of each run's number in the names of its fleet directory "
                           "and JSON file (DIR/pd-T<k>.json)")
    args = top.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    if args.runs < 1:
        demo.error(f"--runs {args.runs}: give N >= 1 stack replays")
    try:
        cmd_demo.check_args(args)  # the demo's own checks, and >= 2 engines for a P + D fleet
        p, _ = cmd_demo.pd_split(args.nodes)
    except ConfigError as exc:
        demo.error(str(exc))

    from bench.agreement import model_heartbeat_s
    from bench.prompts import prepare
    from bench.stack_backend import StackBackend
    from bench.stack_pd_gateway import replay_gateway_pd

    wl = cmd_demo.notebook_workload(args)
    settings, spec, line = cmd_demo.setup(args, wl, args.time_scale, 1.0)
    print(line)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prompts = prepare(wl)
    for k in range(args.runs):
        load = os.getloadavg()
        t0 = time.perf_counter()
        workdir = out / f"fleet-pd-{args.tag}{k}"
        with StackBackend(workdir, cmd_demo.pd_spec(args, wl, spec),
                          front="gateway") as backend:
            run = replay_gateway_pd(backend, wl, p, prompts)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\nrun {args.tag}{k}: {wall:.0f} s, load average {load[0]:.2f} -> "
              f"{load_after[0]:.2f}", flush=True)
        report = cmd_demo.disaggregated(args, wl, settings, {"results": []}, run,
                                        model_heartbeat_s(spec.heartbeat_interval_s,
                                                          args.time_scale))
        (out / f"pd-{args.tag}{k}.json").write_text(json.dumps(
            {"load": [load[0], load_after[0]], "report": report, "stack_rows": _rows(run)})
            + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
