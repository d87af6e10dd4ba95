"""``kvroute bench --mode stack``: the replay through real processes (flags in cli_replay)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.faults import (
    FaultInjector,
    FaultSpec,
    format_summary,
    node_faults,
    parse_faults,
    registries_needed,
)
from bench.replica_order import format_effect, replica_effect, run_order
from bench.replica_order import pairs as replica_pairs
from bench.runner import BenchOutcome, run_comparison
from bench.sim.config import SimSettings
from bench.sim.replicas import ReplicaSettings
from bench.stack_backend import (
    GATEWAY_PREFIX,
    STACK_POLICIES,
    StackBackend,
    split_copy,
    split_front,
)
from bench.stack_fleet import FleetSpec, router_flags
from bench.stack_settings import StackSettings
from bench.workloads.base import Workload
from kvroute.errors import ConfigError
from kvroute.settings import add_value_arguments, from_namespace
from router_service.disagg import DisaggSettings
from router_service.policies.kv_aware import KvAwareSettings


def add_stack_arguments(p: argparse.ArgumentParser) -> None:
    """Flags only ``--mode stack`` uses: one per :class:`StackSettings` field."""
    add_value_arguments(p.add_argument_group("--mode stack"), StackSettings)


def apply_quick(args: argparse.Namespace) -> None:
    """``--quick``: shrink the run before the workload is loaded."""
    if getattr(args, "quick", False):
        args.limit = min(args.limit or 120, 120)
        nodes = from_namespace(SimSettings, args).nodes
        args.nodes = min(nodes, 4)
        args.overhead_pairs = min(args.overhead_pairs, 20)


def _peer_names(value: str | None) -> list[str]:
    if not value:
        return []
    from bench.peers import DEFAULT_PEERS, parse_peer

    names = list(DEFAULT_PEERS) if value.strip() == "default" else \
        [n.strip() for n in value.split(",") if n.strip()]
    out = [n if n.startswith("peer:") else f"peer:{n}" for n in names]
    for n in out:
        try:
            parse_peer(n)
        except ValueError as exc:
            raise ConfigError(f"--peers: {exc}") from exc
    return out


def stack_policies(requested: list[str], explicit: bool) -> list[str]:
    """The policies a stack run replays: the router's own (all of them unless given), each
    optionally as ``gateway:<policy>`` (through the OpenAI gateway instead of Route) and as
    ``<policy>#<label>`` (another replay of it under its own name: an A/A check)."""
    if not explicit:
        return list(STACK_POLICIES)
    bad = [n for n in requested if split_copy(split_front(n)[1])[0] not in STACK_POLICIES]
    if bad:
        raise ConfigError(f"--policies: {', '.join(bad)} run only in --mode sim (the router "
                          f"serves {', '.join(STACK_POLICIES)})")
    dup = sorted({n for n in requested if requested.count(n) > 1})
    if dup:
        raise ConfigError(f"--policies: {', '.join(dup)} given twice; replay a policy again "
                          f"under its own label, e.g. {dup[0]},{dup[0]}#2")
    return requested


def run_stack(args: argparse.Namespace, workload: Workload, settings: SimSettings,
              names: list[str], kv: KvAwareSettings) -> int:
    """Replay ``workload`` through etcd, registry, router, node agents and engine_sim."""
    if settings.latency_model != "default":
        raise ConfigError("--latency-model seed is a --mode sim preset; engine_sim models "
                          "prefill proportional to uncached tokens")
    if args.time_scale <= 0:
        raise ConfigError("--time-scale must be > 0")
    spec = FleetSpec(nodes=settings.nodes, cache_blocks=settings.cache_blocks,
                     block_size=workload.block_size,
                     prefill_tokens_per_s=settings.prefill_tokens_per_s,
                     decode_ms_per_token=settings.decode_s_per_token * 1000.0,
                     max_running=settings.max_batch, time_scale=args.time_scale,
                     router_args=router_flags(kv, args.time_scale))
    faults = parse_faults(args.fault) if getattr(args, "fault", None) else []
    if faults:  # node faults kill one engine or agent: each needs its own process
        spec = dataclasses.replace(spec, registries=registries_needed(faults),
                                   one_process=spec.one_process and not node_faults(faults))
    peers = _peer_names(args.peers)
    if faults and peers:
        raise ConfigError("--fault and --peers: faults are injected into kvroute's own "
                          "stack only; run them separately")
    if peers and names and not any(split_front(n)[0] for n in names):
        # HTTP front against HTTP fronts: the peers are HTTP routers, so is the gateway
        # (--policies '' replays the peers alone: no kvroute fleet is started)
        names = [*names, f"{GATEWAY_PREFIX}kv_aware"]
    if not names and not peers:
        raise ConfigError("--policies '' replays nothing without --peers")
    if any(split_front(n)[0] for n in names):
        spec = dataclasses.replace(spec, gateway=True)
    spec, names = _with_replicas(args, spec, names)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kvroute-"))
    print(f"stack: {spec.nodes} x (engine_sim + agent), registry, {spec.routers} router(s)"
          f"{f', {spec.gateways} gateway(s)' if spec.gateway else ''}, etcd; logs in {workdir}",
          file=sys.stderr)
    fresh = bool(getattr(args, "fresh_fleet", True)) and not faults
    alternate = bool(replica_pairs(names))  # with --repeat: ABBA (bench/replica_order.py)
    t0 = time.perf_counter()
    outs = []
    orders = [run_order(names, k, alternate) for k in range(args.repeat)]
    for k, order in enumerate(orders):
        sub = workdir if args.repeat == 1 else workdir / f"run-{k + 1}"
        if args.repeat > 1:
            print(f"stack: run {k + 1} of {args.repeat}: {', '.join(order)}", file=sys.stderr)
        outs.append(_run_once(workload, settings, order, peers, spec, sub, args.overhead_pairs,
                              args.random_bound, faults, args.time_scale,
                              (getattr(args, "spread", None) or "random", args.seed), fresh))
    out = outs[0]
    if len(outs) > 1:
        from bench.cli_replay import add_spread

        add_spread(out, outs)
    effect = replica_effect([o.report for o in outs], orders) if alternate else {}
    if effect:
        out.report["replica_effect"] = effect
        print(format_effect(effect) + "\n")
    out.report["kv_aware_settings"] = dataclasses.asdict(kv)
    out.report["time_scale"] = args.time_scale
    out.report["fresh_fleet_per_replay"] = fresh
    if spec.routers > 1 or spec.gateways > 1:
        out.report["router_replicas"] = {
            "routers": spec.routers, "gateways": spec.gateways if spec.gateway else 0,
            "spread": getattr(args, "spread", None) or "random",
            "share_routes": "--share-routes" in spec.router_args}
    check = _check_against_sim(out, workload, settings, names, kv, spec, args) \
        if getattr(args, "sim_runs", 0) > 0 else ""
    from bench.report import emit

    emit(out, f"replayed {len(names) + len(peers)} routers x {len(workload.requests)} requests "
              f"through the stack in {time.perf_counter() - t0:.1f} s"
              + (f" ({args.repeat} runs; the table is run 1)" if args.repeat > 1 else ""),
         args.json, args.plot_dir)
    if check:
        print(check)
    if faults:
        print(f"faults {', '.join(map(str, faults))} (window = each fault + "
              f"{FaultInjector.recovery_s:g} s of trace time):")
        for name, summary in out.report["faults"].items():
            print(format_summary(name, summary))
    added = [(r["policy"], r["added_latency_ms"]) for r in out.report["results"]
             if "added_latency_ms" in r]
    if added:
        print("added latency per request (median wall ms; same requests direct vs routed):")
        for name, lat in added:
            print(f"  {name:<34} +{lat['added_ms']:.2f} ms  (direct {lat['direct_ms']:.2f}, "
                  f"routed {lat['routed_ms']:.2f})")
    return 0


def _with_replicas(args: argparse.Namespace, spec: FleetSpec, names: list[str],
                   ) -> tuple[FleetSpec, list[str]]:
    """``--routers N`` / ``--gateways N``: N replicas in the fleet (sharing their view unless
    ``--no-share-routes``) and, next to every policy replayed through one replica, the same
    policy spread over all of them (``POLICY@N``), on the same fleet in the same run: after
    it, or before it with ``--replicas-first``."""
    rs = from_namespace(ReplicaSettings, args)
    gateways = int(getattr(args, "gateways", 1) or 1)
    if gateways < 1:
        raise ConfigError("--gateways must be >= 1")
    if rs.routers == 1 and gateways == 1:
        return spec, names
    if gateways > 1 and not any(split_front(n)[0] for n in names):
        names = [*names, f"{GATEWAY_PREFIX}kv_aware"]
    first = bool(getattr(args, "replicas_first", False))
    out: list[str] = []
    for n in names:
        via_gateway = split_front(n)[0]
        k = gateways if via_gateway else rs.routers
        pair = [n, f"{n}@{k}"] if k > 1 else [n]
        out.extend(reversed(pair) if first else pair)
    share = rs.share_flags(args.time_scale)  # the routers live on the wall clock
    spec = dataclasses.replace(spec, routers=rs.routers, gateways=gateways,
                               gateway=spec.gateway or gateways > 1,
                               router_args=(*spec.router_args, *share))
    return spec, out


def _check_against_sim(out: BenchOutcome, workload: Workload, settings: SimSettings,
                       names: list[str], kv: KvAwareSettings, spec: FleetSpec,
                       args: argparse.Namespace) -> str:
    """``--sim-runs N``: the sim with this run's measured timing, N seeds; the agreement table
    (JSON ``sim_timing``, ``agreement``)."""
    from bench.agreement import (
        agreement,
        format_agreement,
        format_timing,
        stack_timing,
        timed_settings,
    )
    from bench.prompts import as_sent
    from bench.sim.backend import SimBackend

    timing = stack_timing(out.report, args.time_scale, spec.heartbeat_interval_s)
    timed = timed_settings(settings, timing)
    own = sorted({split_copy(split_front(n)[1])[0] for n in names})
    sent = as_sent(workload)  # the block hashes the stack's router computed from its tokens
    # on nodes named as the stack's: session's hash ring maps keys by node name
    nodes = out.runs[0].node_ids if out.runs else None
    sims = [run_comparison(sent, timed, own, SimBackend(timed, seed=args.seed + k,
                                                           kv_settings=kv, node_ids=nodes),
                           random_bound=False)
            for k in range(args.sim_runs)]
    out.report["sim_timing"] = timing
    out.report["agreement"] = agreement(out.report, [o.report for o in sims])
    return format_timing(timing) + "\n" + format_agreement(out.report["agreement"])


def _run_once(workload: Workload, settings: SimSettings, names: list[str], peers: list[str],
              spec: FleetSpec, workdir: Path, overhead_pairs: int,
              random_bound: bool, faults: list[FaultSpec] | None = None,
              time_scale: float = 1.0, spread: tuple[str, int] = ("random", 0),
              fresh_fleet: bool = False) -> BenchOutcome:
    """One comparison on freshly started processes (kvroute's fleet, then each peer's);
    ``fresh_fleet``: a new kvroute fleet for every replay (:class:`StackBackend`)."""
    if peers and not names:  # the peers alone (--policies ''): no kvroute fleet
        from bench.peers import PeerBackend, attach_added_latency

        backend = PeerBackend(workdir / "peers", spec, overhead_pairs=overhead_pairs)
        out = run_comparison(workload, settings, peers, backend, random_bound)
        attach_added_latency(out.report, backend.added_latency)
        return out
    with StackBackend(workdir / "stack", spec, spread=spread[0], seed=spread[1],
                      fresh_fleet=fresh_fleet) as stack:
        if faults:
            injector = FaultInjector(stack.fleet, faults, time_scale)
            stack.hook = injector
            out = run_comparison(workload, settings, names, stack, random_bound)
            out.report["faults"] = injector.results
            return out
        if not peers:
            return run_comparison(workload, settings, names, stack, random_bound)
        from bench.peers import CombinedBackend, PeerBackend, attach_added_latency

        combined = CombinedBackend(stack, PeerBackend(workdir / "peers", spec,
                                                      overhead_pairs=overhead_pairs))
        out = run_comparison(workload, settings, [*names, *peers], combined, random_bound)
        attach_added_latency(out.report, combined.added_latency)
        return out


def run_stack_pd_cli(args: argparse.Namespace, workload: Workload, settings: SimSettings,
                     kv: KvAwareSettings, disagg: DisaggSettings, transfer_s_per_block: float,
                     strategies: list[str], progress: Any) -> dict[str, Any]:
    """``--mode stack --prefill-nodes P --decode-nodes D``: the disaggregated stack replay of
    the strategies the router serves, next to the sim replay of the same strategies;
    ``--pd-gateway``: also through kvroute's OpenAI gateway (row
    ``gateway-pd:POLICY/DECODE``, the fleet's default policy and ``--pd-decode-policy``);
    ``--repeat N``: N replays, each on a fresh fleet, every other one replaying the rows in
    reverse order (ABBA: with an even N, which row ran first cancels in the mean; each row's
    notes say its place), the table and ``--sim-runs`` run 1's (JSON ``repeats``: mean and
    spread over the runs, :mod:`bench.pd_repeats`)."""
    from bench.pd_bench import pd_agreement, pd_metrics, run_pd
    from bench.pd_repeats import summarize
    from bench.stack_pd import STACK_PD_STRATEGIES, run_stack_pd
    from bench.stack_pd_gateway import pd_router_flags

    bad = [s for s in strategies if s not in STACK_PD_STRATEGIES]
    if bad:
        raise ConfigError(f"--pd-strategies: {', '.join(bad)} not served by the router; "
                          f"--mode stack runs {', '.join(STACK_PD_STRATEGIES)}")
    p, d = args.prefill_nodes, args.decode_nodes
    ts = args.time_scale
    pd_flags = pd_router_flags(disagg, ts)  # the router lives on the wall clock
    spec = FleetSpec(nodes=p + d, cache_blocks=settings.cache_blocks,
                     block_size=workload.block_size,
                     prefill_tokens_per_s=settings.prefill_tokens_per_s,
                     decode_ms_per_token=settings.decode_s_per_token * 1000.0,
                     max_running=settings.max_batch, time_scale=ts,
                     router_args=(*router_flags(kv, ts), *pd_flags),
                     roles=("prefill",) * p + ("decode",) * d,
                     transfer_ms_per_block=transfer_s_per_block * 1000.0,
                     gateway=bool(getattr(args, "pd_gateway", False)))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kvroute-"))
    print(f"stack: {p} prefill + {d} decode engine_sim with agents, registry, router"
          f"{', gateway' if spec.gateway else ''}, etcd; logs in {workdir}", file=sys.stderr)
    peers = [x.strip() for x in (args.pd_peers or "").split(",") if x.strip()]
    for peer in peers:
        name, _, pair = peer.partition(":")
        if name not in ("vllm-router", "sglang-router") or "/" not in pair:
            raise ConfigError(f"--pd-peers: {peer!r} is not vllm-router:PREFILL/DECODE or "
                              f"sglang-router:PREFILL/DECODE")
    repeat = int(args.repeat)  # validated by cli_replay._prepare (StackSettings)
    per_run: list[list[dict[str, Any]]] = []
    for k in range(repeat):  # each run on a freshly started fleet
        sub = workdir if repeat == 1 else workdir / f"run-{k + 1}"
        if repeat > 1:
            print(f"stack: run {k + 1} of {repeat}", file=sys.stderr)
        per_run.append([pd_metrics(r) for r in run_stack_pd(
            sub / "stack-pd", spec, workload, p, strategies, progress, peers,
            disagg.pd_decode_policy, reverse=k % 2 == 1)])  # ABBA over the runs
    sim = run_pd(workload, settings, p, d, transfer_s_per_block, kv, disagg, strategies,
                 args.seed)
    for r in sim["results"]:
        r["policy"] = "sim:" + r["policy"].removeprefix("pd:")
    rows = per_run[0]
    check: dict[str, Any] = {}
    if getattr(args, "sim_runs", 0) > 0:  # the median of seeded sims under the stack's timing
        check = pd_agreement(rows, workload, settings, p, d, transfer_s_per_block, kv, disagg,
                             strategies, ts, spec.heartbeat_interval_s, args.sim_runs,
                             args.seed)
    return {"mode": f"stack, time_scale {ts}", "workload": workload.name,
            "requests": len(workload.requests), "prefill_nodes": p, "decode_nodes": d,
            "cache_blocks_per_node": settings.cache_blocks, "block_size": workload.block_size,
            "transfer_s_per_block": transfer_s_per_block,
            "disagg_settings": dataclasses.asdict(disagg),
            "results": rows + sim["results"], "bounds": sim["bounds"], **check,
            **({"repeats": summarize(per_run)} if repeat > 1 else {})}
