"""``kvroute bench [hashing|...]``: benchmarks with JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cli_replay import add_replay_arguments, run_replay, run_sweep
from bench.flood_bench import add_flood_arguments, run_flood_cli
from bench.hashing import run_hashing_bench
from bench.registry_bench import add_registry_arguments, run_registry_cli
from bench.router_bench import add_router_arguments, run_router_cli


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


def _agent(args: argparse.Namespace) -> int:
    from node_agent.perf import measure

    res = measure(args.agent_seconds)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


TARGETS: dict[str, Callable[[argparse.Namespace], int]] = {
    "replay": run_replay,
    "sweep": run_sweep,
    "hashing": _hashing,
    "router": run_router_cli,
    "registry": run_registry_cli,
    "agent": _agent,
    "flood": run_flood_cli,
}


def add_parser(sub: Any) -> None:
    """Register ``bench``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "bench", help="benchmarks: replay traces through policies, hashing throughput",
        description="Benchmarks. TARGET 'replay' (default) compares routing policies on a "
                    "trace side by side; 'sweep' plots hit rate against cache capacity; "
                    "'hashing' measures canonical block hashing throughput.")
    p.add_argument("target", nargs="?", default="replay", metavar="TARGET",
                   help="replay (default), sweep, hashing, registry, router, agent, flood "
                        "(a rogue registry client: refusal, RSS and Route p99 under a flood)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON to PATH")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (hashing)")
    p.add_argument("--prompt-tokens", type=int, default=100_000,
                   help="tokens per prompt (hashing)")
    p.add_argument("--prompts", type=int, default=20, help="prompts to hash (hashing)")
    p.add_argument("--agent-seconds", type=float, default=1.0, metavar="S",
                   help="seconds per measured case (agent: event parsing and hashing rates, "
                        "heartbeat sizes)")
    add_replay_arguments(p)
    add_router_arguments(p)
    add_registry_arguments(p)
    add_flood_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the benchmark target."""
    fn = TARGETS.get(args.target)
    if fn is None:
        print(f"kvroute bench: unknown target {args.target!r}; choose from "
              f"{', '.join(TARGETS)}", file=sys.stderr)
        return 2
    return fn(args)
