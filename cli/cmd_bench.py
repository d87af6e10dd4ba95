"""``kvroute bench [TARGET]``: benchmarks with JSON output, one subcommand per target.

``kvroute bench --trace ...`` (no target) is ``kvroute bench replay --trace ...``: the bench
parser itself carries the replay flags, so the README's commands keep working. Every other
target has its own subparser with only its own flags (``kvroute bench TARGET --help``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from bench.cli_replay import add_replay_arguments, run_replay, run_sweep
from bench.decide_bench import add_decide_arguments, run_decide_cli
from bench.epp_bench import add_epp_arguments, run_epp_cli
from bench.flood_bench import add_flood_arguments, run_flood_cli
from bench.hashing import run_hashing_bench
from bench.registry_bench import add_registry_arguments, run_registry_cli
from bench.router_bench import add_router_arguments, run_router_cli


def _add_hashing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=100_000,
                   help="tokens per prompt (default 100000)")
    p.add_argument("--prompts", type=int, default=20, help="prompts to hash (default 20)")


def _hashing(args: argparse.Namespace) -> int:
    res = run_hashing_bench(block_size=args.block_size, prompt_tokens=args.prompt_tokens,
                            prompts=args.prompts)
    out = res.as_dict()
    print(f"block hashing, {res.block_size}-token blocks, {res.prompts} prompts of "
          f"{res.prompt_tokens} tokens, one core:")
    print(f"  from list[int]:      {res.tokens_per_s_list_input / 1e6:8.1f} M tokens/s")
    print(f"  from numpy uint32:   {res.tokens_per_s_array_input / 1e6:8.1f} M tokens/s")
    print(f"  target:              {res.target_tokens_per_s / 1e6:8.1f} M tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _add_agent_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent-seconds", type=float, default=1.0, metavar="S",
                   help="seconds per measured case (default 1)")


def _agent(args: argparse.Namespace) -> int:
    from node_agent.perf import measure

    res = measure(args.agent_seconds)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _add_router_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per block of the registry and router (default 16)")
    add_router_arguments(p)


def _add_share_arguments(p: argparse.ArgumentParser) -> None:
    from bench.share_bench import add_share_arguments

    add_share_arguments(p)


def _share(args: argparse.Namespace) -> int:
    from bench.share_bench import run_share_cli

    return run_share_cli(args)


class Target(NamedTuple):
    """One ``kvroute bench`` subcommand."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


TARGETS: dict[str, Target] = {
    "replay": Target("compare routing policies on a trace or generated workload (the default "
                     "target), in-process (--mode sim) or through real processes (--mode stack)",
                     lambda p: add_replay_arguments(p, sweep=False), run_replay),
    "sweep": Target("hit rate against cache capacity for every policy and the bounds",
                    lambda p: add_replay_arguments(p, sweep=True), run_sweep),
    "hashing": Target("canonical block hashing throughput (one core)",
                      _add_hashing_arguments, _hashing),
    "router": Target("Route latency and decisions/s over gRPC, registry in the path",
                     _add_router_arguments, run_router_cli),
    "registry": Target("index memory, Lookup latency, Heartbeat ingest, etcd bytes per event",
                       add_registry_arguments, run_registry_cli),
    "agent": Target("node agent: event parsing and hashing rates, heartbeat sizes",
                    _add_agent_arguments, _agent),
    "share": Target("staleness of the shared view of load between router replicas through a "
                    "real registry (RouteShare.Exchange)", _add_share_arguments, _share),
    "decide": Target("in-process cost of one routing decision (router core, index mirror "
                     "populated) and one registry Lookup, per fleet size",
                     add_decide_arguments, run_decide_cli),
    "epp": Target("endpoint picker's added latency through a real Envoy vs Envoy round robin",
                  add_epp_arguments, run_epp_cli),
    "flood": Target("a rogue registry client sending 1 M-hash heartbeats: refusal, registry "
                    "and router RSS, Route p99 before and during the flood",
                    add_flood_arguments, run_flood_cli),
}


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write results as JSON to PATH")


def add_parser(sub: Any) -> None:
    """Register ``bench`` and one subcommand per target."""
    p: argparse.ArgumentParser = sub.add_parser(
        "bench", help="benchmarks (JSON output): replay, sweep, hashing, router, registry, "
                 "agent, share, decide, flood, epp",
        usage="kvroute bench [TARGET] [options]   (no TARGET = replay)",
        description="Benchmarks with JSON output. Without a TARGET, runs 'replay' with the "
                    "flags below; 'kvroute bench TARGET --help' lists a target's own flags.")
    _add_json(p)
    add_replay_arguments(p, sweep=False)
    p.set_defaults(run=run_replay)
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=False,
                               prog="kvroute bench", title="targets (default: replay)")
    for name, t in TARGETS.items():
        sp = targets.add_parser(name, help=t.help, description=t.help)
        _add_json(sp)
        t.add_arguments(sp)
        sp.set_defaults(run=t.run)
