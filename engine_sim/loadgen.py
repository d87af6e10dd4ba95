"""Measure how many requests/s an engine_sim process sustains (HTTP + scheduler + events).

``python -m engine_sim.loadgen --url http://127.0.0.1:PORT --requests 3000 --concurrency 32``
prints one JSON line: wall time, requests/s, client latency p50/p99, and the engine's own hit rate
and evictions from ``/kvroute/stats``. Prompts share one of 8 prefixes (512 tokens) plus 256
unique tokens, 16 output tokens; run the engine with a small ``--time-scale`` so the model's
latency does not dominate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import aiohttp


async def run(url: str, n: int, concurrency: int, stream: bool) -> dict[str, Any]:
    """Send ``n`` completions with ``concurrency`` in flight; return the measurement."""
    rnd = random.Random(1)
    prefixes = [[rnd.randrange(100, 50000) for _ in range(512)] for _ in range(8)]
    prompts = [prefixes[i % 8] + [rnd.randrange(100, 50000) for _ in range(256)]
               for i in range(n)]
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def one(i: int) -> None:
            body = {"prompt": prompts[i], "max_tokens": 16, "user": f"load-{i}", "stream": stream}
            async with sem:
                t = time.perf_counter()
                async with session.post(url + "/v1/completions", json=body) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status} from {url}")
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
        async with session.get(url + "/kvroute/stats?records=0") as resp:
            stats = await resp.json()
    lat.sort()
    return {"requests": n, "concurrency": concurrency, "stream": stream,
            "wall_s": round(wall, 3), "requests_per_s": round(n / wall, 1),
            "p50_ms": round(lat[n // 2] * 1000, 2),
            "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1000, 2),
            "engine_hit_rate": round(stats["hit_rate"], 4),
            "engine_evicted_blocks": stats["evicted_blocks"]}


def main() -> None:
    """CLI entry."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", required=True, help="engine_sim base URL")
    p.add_argument("--requests", type=int, default=3000, help="requests to send")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--stream", action="store_true", help="use SSE streaming")
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.url, a.requests, a.concurrency, a.stream))))


if __name__ == "__main__":
    main()
