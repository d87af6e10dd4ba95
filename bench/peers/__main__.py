"""``python -m bench.peers``: kvroute's stack policies and the real peer routers, one table.

Until ``kvroute bench --mode stack --peers LIST`` is wired, this is the head-to-head's driver:
kvroute rows through :class:`bench.stack_backend.StackBackend` (etcd, registry, router, agents,
engine_sim), peer rows through :class:`bench.peers.PeerBackend` (a fresh engine_sim fleet per
peer, same FleetSpec), all in one ``run_comparison`` and one report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import (
    DEFAULT_PEERS,
    CombinedBackend,
    PeerBackend,
    attach_added_latency,
    parse_peer,
    spec_from_settings,
)
from bench.sim.config import SimSettings
from engine_sim.params import DEFAULT_PREFILL_TOKENS_PER_S


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    p.add_argument("--workload", default="mooncake-sample", help="workload name")
    p.add_argument("--trace", default=None, help="Mooncake-format JSONL trace instead")
    p.add_argument("--limit", type=int, default=1500,
                   help="first N requests (default 1500: the whole shipped sample)")
    p.add_argument("--nodes", type=int, default=8, help="engines per fleet (default 8)")
    p.add_argument("--cache-fraction", type=float, default=0.25,
                   help="cache per engine = F x distinct blocks / nodes (default 0.25)")
    p.add_argument("--time-scale", type=float, default=0.2,
                   help="wall seconds per trace second (default 0.2 = 5x; the same default as "
                        "kvroute bench --mode stack)")
    p.add_argument("--policies", default="gateway:kv_aware,kv_aware,round_robin,random",
                   help="kvroute policies, through the Route API (kv_aware) or the OpenAI "
                        "gateway (gateway:kv_aware) (default gateway:kv_aware,kv_aware,"
                        "round_robin,random)")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS), help="router:policy,...")
    p.add_argument("--overhead-pairs", type=int, default=100,
                   help="direct-vs-routed request pairs for the added latency (0 = skip)")
    p.add_argument("--latency-only", action="store_true",
                   help="only the routers' added latency, on a 2-engine fleet at time_scale "
                        "0.001, at --latency-sizes prompt tokens")
    p.add_argument("--latency-sizes", default="256,2048,16384", help="probe prompt sizes")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 120 requests, 4 nodes, 20 overhead pairs")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--workdir", default=None, help="logs (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the head-to-head; print the table and the added latencies."""
    from bench.report import format_table
    from bench.runner import default_cache_blocks, run_comparison
    from bench.stack_backend import StackBackend
    from bench.workloads import load_workload

    a = _args(argv)
    if a.quick:
        a.limit, a.nodes, a.overhead_pairs = 120, 4, 20
    peers = [f"peer:{n.strip()}" for n in a.peers.split(",") if n.strip()]
    for n in peers:
        parse_peer(n)
    policies = [n.strip() for n in a.policies.split(",") if n.strip()]
    wl = load_workload(trace=a.trace, workload=None if a.trace else a.workload, limit=a.limit)
    cache = default_cache_blocks(wl, a.nodes, a.cache_fraction)
    settings = SimSettings(nodes=a.nodes, cache_blocks=cache, block_size=wl.block_size,
                           prefill_tokens_per_s=DEFAULT_PREFILL_TOKENS_PER_S)
    spec = spec_from_settings(settings, a.time_scale)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="kvroute-peers-"))
    print(f"{wl.name}: {len(wl.requests)} requests over {wl.requests[-1].arrival_s:.0f} s, "
          f"{a.nodes} engines x {cache} blocks of {wl.block_size} tokens, time_scale "
          f"{a.time_scale}; logs in {work}", flush=True)
    t0 = time.perf_counter()
    if a.latency_only:
        from bench.peers.latency import format_latency, measure_routers

        sizes = [int(x) for x in a.latency_sizes.split(",") if x.strip()]
        table = measure_routers([*policies, *peers], spec, work, sizes, a.overhead_pairs)
        print(format_latency(table))
        print(f"finished in {time.perf_counter() - t0:.0f} s")
        if a.json:
            Path(a.json).write_text(json.dumps({n: {str(s): v.as_dict() for s, v in row.items()}
                                                for n, row in table.items()}, indent=2) + "\n")
        return 0
    peer_backend = PeerBackend(work / "peers", spec, overhead_pairs=a.overhead_pairs)
    if any(n.startswith("gateway:") for n in policies):
        spec = dataclasses.replace(spec, gateway=True)
    with StackBackend(work / "stack", spec) as stack:
        backend = CombinedBackend(stack, peer_backend)
        out = run_comparison(wl, settings, [*policies, *peers], backend)
    attach_added_latency(out.report, backend.added_latency)
    out.report["time_scale"] = a.time_scale
    print(format_table(out.report))
    print("\nadded latency per request (median wall ms; same requests direct vs routed):")
    for row in out.report["results"]:
        lat = row.get("added_latency_ms")
        if lat:
            print(f"  {row['policy']:<34} +{lat['added_ms']:.2f} ms  (direct "
                  f"{lat['direct_ms']:.2f}, routed {lat['routed_ms']:.2f})")
    for row in out.report["results"]:
        for note in row.get("notes", []):
            print(f"  [{row['policy']}] {note}")
    print(f"finished in {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out.report, indent=2) + "\n")
        print(f"JSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
