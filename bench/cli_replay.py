"""``kvroute bench [replay|sweep]``: flags and drivers (wired by ``cli/cmd_bench.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.policies import ALL_POLICIES, BUILDABLE_POLICIES
from bench.sim.config import SimSettings
from bench.sim.replicas import ReplicaSettings
from bench.stack_settings import stack_settings
from bench.workloads import WORKLOAD_NAMES, TraceFormatError, load_workload
from bench.workloads.base import SPREAD_SHAPES, Workload
from kvroute.errors import ConfigError
from kvroute.settings import add_arguments, env_name, from_namespace
from router_service.disagg import DisaggSettings
from router_service.policies.kv_aware import KvAwareSettings

if TYPE_CHECKING:
    from bench.runner import BenchOutcome


def add_replay_arguments(p: argparse.ArgumentParser, *, sweep: bool) -> None:
    """Flags of the replay (``sweep=False``) or sweep target (stable: scripts use them).

    The engine-model flags are derived from :class:`SimSettings` (one flag per field, with the
    field's help and default, and ``KVROUTE_<FIELD>`` variables), so they cannot drift from it.
    """
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", metavar="PATH", help="Mooncake-format JSONL trace to replay")
    src.add_argument("--workload", metavar="NAME", choices=WORKLOAD_NAMES,
                     help=f"generated or shipped workload: {', '.join(WORKLOAD_NAMES)} "
                          "(default: mooncake-sample, the shipped 1,500-request trace sample)")
    p.add_argument("--mode", choices=("sim", "stack"), default="sim",
                   help="sim: in-process discrete-event replay; stack: real etcd, registry, "
                        "router, node agent and engine_sim processes with compressed time")
    p.add_argument("--policies", default=None, metavar="A,B,...",
                   help=f"policies to compare (default all: {','.join(ALL_POLICIES)}; in "
                        "--mode stack the router's own)")
    p.add_argument("--plot-dir", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of generators and random policies")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N requests only")
    p.add_argument("--start", type=int, default=0, metavar="K",
                   help="skip the first K requests (e.g. replay the second half of a trace)")
    if sweep:
        p.add_argument("--sweep-fractions", default="0.05,0.1,0.25,0.5,1.0", metavar="F,...",
                       help="per-node cache = F x distinct blocks / nodes, one run per F")
    p.add_argument("--arrival-spread-s", type=float, default=0.0, metavar="S",
                   help="spread requests that share one arrival time evenly over the next S "
                        "seconds (the Mooncake traces quantise arrivals to ~3 s ticks; 0 = "
                        "replay the bursts as they are; the table's arrivals line says whether "
                        "the trace is quantised)")
    p.add_argument("--arrival-spread-shape", choices=SPREAD_SHAPES, default="even",
                   help="with --arrival-spread-s: even (evenly in trace order) or uniform (each "
                        "request at a uniform draw in the tick, seeded by --seed: Poisson "
                        "arrivals given the tick's count, so some land close together)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    engine = p.add_argument_group("engine model of every simulated node (SimSettings)")
    add_arguments(engine, SimSettings)  # type: ignore[arg-type]
    if not sweep:
        from bench.cli_stack import add_stack_arguments

        add_stack_arguments(p)
        _add_pd_arguments(p)
    if not sweep:
        reps = p.add_argument_group(
            "router replicas (issue 19: N routers behind a Service, sharing their view of load "
            "or not; --mode stack uses --routers, --spread, --share-routes, --share-max-blocks, "
            "--share-burst-window-s, --share-burst-window-min-wall-s, --share-burst-coincidence "
            "and --share-burst-stagger-s, see also --gateways)")
        add_arguments(reps, ReplicaSettings)  # type: ignore[arg-type]
    group = p.add_argument_group(
        "kv_aware policy settings (the router's flags and KVROUTE_KV_* variables; here "
        "--kv-prefill-tokens-per-s defaults to --prefill-tokens-per-s, the engines' true rate)")
    add_arguments(group, KvAwareSettings)  # type: ignore[arg-type]


def _add_pd_arguments(p: argparse.ArgumentParser) -> None:
    from bench.pd_bench import PD_STRATEGIES
    from engine_sim.params import TRANSFER_PRESETS

    g = p.add_argument_group(
        "disaggregated prefill/decode (--mode sim): P prefill + D decode engines, compared "
        "with kv_aware on an aggregated fleet of P+D engines")
    g.add_argument("--prefill-nodes", type=int, default=0, metavar="P",
                   help="prefill engines (with --decode-nodes: run disaggregated; --nodes is "
                        "then ignored)")
    g.add_argument("--decode-nodes", type=int, default=0, metavar="D", help="decode engines")
    g.add_argument("--transfer-s-per-block", default="seed", metavar="S|PRESET",
                   help="engines' KV transfer cost, seconds per block moved, or a preset "
                        "in seconds per 512 tokens, scaled to the block size: "
                        + ", ".join(f"{k}={v:g}" for k, v in TRANSFER_PRESETS.items())
                        + " (default seed; --pd-transfer-s-per-block defaults to it)")
    g.add_argument("--pd-strategies", default=",".join(PD_STRATEGIES), metavar="P/D,...",
                   help="prefill policy/decode choice pairs to compare")
    g.add_argument("--pd-peers", default="", metavar="vllm-router:P/D,...",
                   help="--mode stack: peer routers in their PD modes in front of the same "
                        "engines: vllm-router --vllm-pd-disaggregation, e.g. "
                        "vllm-router:kv_aware/power_of_two (its kv_aware needs 16-token blocks), "
                        "vllm-router:cache_aware/power_of_two; sglang-router --pd-disaggregation "
                        "(SGLang's bootstrap protocol), e.g. sglang-router:cache_aware/"
                        "power_of_two")
    g.add_argument("--pd-gateway", action="store_true",
                   help="--mode stack: also replay through kvroute's OpenAI gateway (kvroute "
                        "serve gateway orchestrates each pair in-process and releases the "
                        "prefill node at its answer, like a proxy peer); row "
                        "gateway-pd:kv_aware/DECODE (--pd-decode-policy)")
    add_arguments(g, DisaggSettings)  # type: ignore[arg-type]


def _settings(args: argparse.Namespace, workload: Workload) -> SimSettings:
    from bench.runner import resolve_settings

    s = from_namespace(SimSettings, args)
    if s.mixed_batch_slowdown and getattr(args, "mode", "sim") != "sim":
        raise ConfigError("--mixed-batch-slowdown is a --mode sim what-if (engine_sim "
                          "processes do not model it)")
    pn, dn = getattr(args, "prefill_nodes", 0) or 0, getattr(args, "decode_nodes", 0) or 0
    if getattr(args, "pd_gateway", False):
        if getattr(args, "mode", "sim") != "stack":
            raise ConfigError("--pd-gateway: the gateway row needs --mode stack (the sim has "
                              "no gateway process)")
        if not pn:
            raise ConfigError("--pd-gateway: the gateway's disaggregated row needs "
                              "--prefill-nodes P --decode-nodes D (without them the run is "
                              "aggregated and has no gateway PD row)")
    if pn or dn:
        if pn < 1 or dn < 1:
            raise ConfigError("--prefill-nodes and --decode-nodes: give both, each >= 1")
        s = dataclasses.replace(s, nodes=pn + dn)
    return resolve_settings(workload, s)


def run_pd_replay(args: argparse.Namespace, workload: Workload, settings: SimSettings,
                  kv: KvAwareSettings) -> int:
    """The disaggregated comparison (:mod:`bench.pd_bench`)."""
    from bench.pd_bench import print_pd, run_pd, run_strategies, write_json
    from bench.pd_repeats import format_repeats, summarize
    from engine_sim.params import TRANSFER_PRESETS, transfer_s_per_block
    from router_service.disagg import DECODE_POLICIES

    try:
        try:
            transfer = transfer_s_per_block(str(args.transfer_s_per_block), settings.block_size)
        except ValueError:
            raise ConfigError(f"--transfer-s-per-block: not a number >= 0 or a preset "
                              f"({', '.join(TRANSFER_PRESETS)}): "
                              f"{args.transfer_s_per_block!r}") from None
        given = getattr(args, "pd_transfer_s_per_block", None) is not None or \
            env_name("pd_transfer_s_per_block") in os.environ
        disagg = from_namespace(DisaggSettings, args) if given else \
            from_namespace(DisaggSettings, args, pd_transfer_s_per_block=transfer)
        strategies = [x.strip() for x in args.pd_strategies.split(",") if x.strip()]
        for st in strategies:
            pre, _, dec = st.partition("/")
            if pre not in BUILDABLE_POLICIES or dec not in DECODE_POLICIES:
                raise ConfigError(f"--pd-strategies: {st!r} is not PREFILL/DECODE with "
                                  f"PREFILL in {', '.join(BUILDABLE_POLICIES)} and DECODE in "
                                  f"{', '.join(DECODE_POLICIES)}")
    except (ConfigError, ValueError) as exc:
        print(f"kvroute bench: {exc}", file=sys.stderr)
        return 2
    repeat = int(args.repeat)  # validated by _prepare (StackSettings)
    t0 = time.perf_counter()
    fronts = len(strategies) + int(bool(getattr(args, "pd_gateway", False)))
    bar = _Progress(len(workload.requests) * (fronts * repeat + 1), args.no_progress)
    if args.mode == "stack":
        from bench.cli_stack import run_stack_pd_cli

        try:
            report = run_stack_pd_cli(args, workload, settings, kv, disagg, transfer,
                                      strategies, bar)
        except ConfigError as exc:
            bar.close()
            print(f"kvroute bench: {exc}", file=sys.stderr)
            return 2
    else:
        report = run_pd(workload, settings, args.prefill_nodes, args.decode_nodes, transfer, kv,
                        disagg, strategies, args.seed, bar)
        if repeat > 1:  # seeds --seed .. --seed + N - 1
            report["repeats"] = summarize([report["results"], *(
                run_strategies(workload, settings, args.prefill_nodes, args.decode_nodes,
                               transfer, kv, disagg, strategies, args.seed + k, bar)
                for k in range(1, repeat))])
    bar.close()
    print_pd(report)
    if report.get("repeats"):
        print(format_repeats(report["repeats"]))
    if report.get("agreement"):
        from bench.agreement import format_agreement, format_timing

        print(format_timing(report["sim_timing"]))
        print(format_agreement(report["agreement"]))
    print(f"{len(report['results'])} rows x {len(workload.requests)} requests, replayed in "
          f"{time.perf_counter() - t0:.1f} s"
          + (f" (--repeat {repeat}: the table is run 1)" if repeat > 1 else ""))
    if args.json:
        write_json(report, args.json)
        print(f"JSON: {args.json}")
    return 0


def _load(args: argparse.Namespace) -> Workload:
    w = load_workload(trace=args.trace, workload=args.workload, seed=args.seed,
                      start=args.start, limit=args.limit)
    spread = getattr(args, "arrival_spread_s", 0.0) or 0.0
    if spread < 0:
        raise ConfigError("--arrival-spread-s: must be >= 0")
    return w.spread_ticks(spread, getattr(args, "arrival_spread_shape", "even"), args.seed)


def _policies(args: argparse.Namespace) -> list[str]:
    if args.mode == "stack":
        from bench.cli_stack import stack_policies

        given = [n.strip() for n in (args.policies or "").split(",") if n.strip()]
        return stack_policies(given, args.policies is not None)
    names = [n.strip() for n in (args.policies or ",".join(ALL_POLICIES)).split(",")
             if n.strip()]
    bad = [n for n in names if n not in ALL_POLICIES]
    if bad or not names:
        raise ConfigError(f"--policies: unknown {', '.join(bad) or '(empty)'}; "
                          f"choose from {', '.join(ALL_POLICIES)}")
    return names


def _kv_settings(args: argparse.Namespace, rate: float) -> KvAwareSettings:
    given = getattr(args, "kv_prefill_tokens_per_s", None) is not None or \
        env_name("kv_prefill_tokens_per_s") in os.environ
    if given:
        return from_namespace(KvAwareSettings, args)
    return from_namespace(KvAwareSettings, args, kv_prefill_tokens_per_s=rate)


class _Progress:
    def __init__(self, total: int, disable: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="req", disable=True if disable else None,
                        file=sys.stderr, leave=False)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _prepare(args: argparse.Namespace, stack_flags: bool = False,
             ) -> tuple[Workload, SimSettings, list[str], KvAwareSettings] | int:
    """Workload and settings of a run (``stack_flags``: the parser has the
    :class:`StackSettings` flags, validated here for every mode and path), or exit status 2."""
    try:
        workload = _load(args)
        settings = _settings(args, workload)
        if stack_flags:
            stack_settings(args)  # --repeat >= 1, --sim-runs >= 0
        names = _policies(args)
        kv = _kv_settings(args, settings.prefill_tokens_per_s)
    except (ConfigError, TraceFormatError, ValueError, OSError) as exc:
        print(f"kvroute bench: {exc}", file=sys.stderr)
        return 2
    if not workload.requests:
        print("kvroute bench: the workload selection is empty", file=sys.stderr)
        return 2
    return workload, settings, names, kv


def run_replay(args: argparse.Namespace) -> int:
    """Compare policies on one workload; table, optional JSON and plots."""
    from bench.cli_stack import apply_quick
    from bench.runner import run_comparison
    from bench.sim.backend import SimBackend

    apply_quick(args)
    prep = _prepare(args, stack_flags=True)
    if isinstance(prep, int):
        return prep
    workload, settings, names, kv = prep
    if getattr(args, "prefill_nodes", 0):
        return run_pd_replay(args, workload, settings, kv)
    if args.mode == "stack":
        from bench.cli_stack import run_stack

        return run_stack(args, workload, settings, names, kv)
    t0 = time.perf_counter()
    bar = _Progress(len(workload.requests) * len(names) * int(args.repeat), args.no_progress)
    try:
        replicas = from_namespace(ReplicaSettings, args)
    except (ConfigError, ValueError) as exc:
        print(f"kvroute bench: {exc}", file=sys.stderr)
        return 2
    repeat = int(args.repeat)  # validated by _prepare (StackSettings)
    outs = [run_comparison(workload, settings, names,
                           SimBackend(settings, seed=args.seed + k, progress=bar,
                                      kv_settings=kv, replicas=replicas))
            for k in range(repeat)]
    bar.close()
    out = outs[0]
    if repeat > 1:
        add_spread(out, outs)
    out.report["kv_aware_settings"] = dataclasses.asdict(kv)
    out.report["router_replicas"] = dataclasses.asdict(replicas)
    from bench.report import emit

    emit(out, f"replayed {len(names)} policies x {len(workload.requests)} requests in "
              f"{time.perf_counter() - t0:.1f} s"
              + (f" ({repeat} runs, seeds {args.seed}..{args.seed + repeat - 1}; the table is "
                 f"run 1)" if repeat > 1 else ""), args.json, args.plot_dir)
    return 0


def add_spread(out: BenchOutcome, outs: list[BenchOutcome]) -> None:
    """Print runs 2.. and the run-to-run spread; put every run and the spread in ``out``'s
    report (``runs``, ``spread``)."""
    from bench.report import format_table
    from bench.spread import format_spread, spread

    reports = [dict(o.report) for o in outs]  # copies: the first one is out.report itself
    out.report["runs"] = reports
    out.report["spread"] = spread(reports, [{r.policy: list(r.node) for r in o.runs}
                                            for o in outs])
    for k, rep in enumerate(reports[1:], 2):  # before the JSON: a table is never lost
        print(f"run {k}:")
        print(format_table(rep))
        print()
    print(format_spread(out.report["spread"]))
    print()


def run_sweep(args: argparse.Namespace) -> int:
    """Hit rate vs cache capacity for every policy and the bounds."""
    from bench.bounds import merged_lru, oracle
    from bench.metrics import policy_metrics
    from bench.runner import default_cache_blocks
    from bench.sim.backend import SimBackend

    if args.mode == "stack":
        print("kvroute bench sweep: runs in --mode sim only", file=sys.stderr)
        return 2
    prep = _prepare(args)
    if isinstance(prep, int):
        return prep
    workload, settings, names, kv = prep
    fractions = [float(f) for f in args.sweep_fractions.split(",") if f.strip()]
    caps = sorted({default_cache_blocks(workload, settings.nodes, f) for f in fractions})
    orc = oracle(workload).hit_rate_tokens
    sweep: dict[str, Any] = {"workload": workload.name, "nodes": settings.nodes,
                             "cache_blocks": caps, "oracle": round(orc, 4), "merged_lru": [],
                             "policies": {n: [] for n in names}, "load_max_over_mean": {
                                 n: [] for n in names}}
    bar = _Progress(len(workload.requests) * len(names) * len(caps), args.no_progress)
    for cap in caps:
        s = dataclasses.replace(settings, cache_blocks=cap)
        merged = merged_lru(workload, cap * settings.nodes).hit_rate_tokens
        sweep["merged_lru"].append(round(merged, 4))
        backend = SimBackend(s, seed=args.seed, progress=bar, kv_settings=kv)
        for n in names:
            m = policy_metrics(backend.replay(workload, n), merged, orc)
            sweep["policies"][n].append(m["hit_rate_tokens"])
            sweep["load_max_over_mean"][n].append(m["load_max_over_mean"])
    bar.close()
    print(f"hit rate vs cache per node — {workload.name}, {settings.nodes} nodes "
          f"(oracle {orc:.3f})")
    print(f"{'cache/node':<14}" + "".join(f"{c:>9d}" for c in caps))
    print(f"{'merged-LRU':<14}" + "".join(f"{v:9.3f}" for v in sweep["merged_lru"]))
    for n in names:
        print(f"{n:<14}" + "".join(f"{v:9.3f}" for v in sweep["policies"][n]))
    if args.json:
        Path(args.json).write_text(json.dumps(sweep, indent=2) + "\n")
        print(f"JSON: {args.json}")
    if args.plot_dir:
        from bench.plots import sweep_plot

        d = Path(args.plot_dir)
        d.mkdir(parents=True, exist_ok=True)
        sweep_plot(sweep, d / "hit_rate_vs_cache.png")
        print(f"plot: {d / 'hit_rate_vs_cache.png'}")
    return 0
