"""Client-side load shapes of ``kvroute bench router`` (run in spawned client processes).

Closed loop (N concurrent unary callers), open loop (a fixed request rate), and RouteStream with a
window of outstanding requests per stream; each returns per-call latencies.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvroute.v1 import router_pb2, router_pb2_grpc


def _summary(lat_s: list[float], wall_s: float) -> dict[str, float]:
    if not lat_s:
        return {"count": 0, "per_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    a = np.asarray(lat_s) * 1000
    return {"count": len(lat_s), "per_s": round(len(lat_s) / wall_s, 1),
            "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3)}


async def _closed(call: Callable[[int], Awaitable[Any]], conc: int, dur: float) -> list[float]:
    lat: list[float] = []
    end = time.perf_counter() + dur
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.perf_counter() < end:
            i = next(counter)
            t = time.perf_counter()
            await call(i)
            lat.append(time.perf_counter() - t)

    await asyncio.gather(*(worker() for _ in range(conc)))
    return lat


async def _open(call: Callable[[int], Awaitable[Any]], rate: float, dur: float) -> list[float]:
    lat: list[float] = []
    tasks = []
    start = time.perf_counter()

    async def one(i: int) -> None:
        t = time.perf_counter()
        await call(i)
        lat.append(time.perf_counter() - t)

    i = 0
    while (now := time.perf_counter()) < start + dur:
        due = start + i / rate
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.create_task(one(i)))
        i += 1
    await asyncio.gather(*tasks)
    return lat


async def _streams(stub: Any, reqs: list[router_pb2.RouteRequest],
                   n: int, window: int, dur: float, tag: str, empty: bool = False,
                   ) -> list[float]:
    lat: list[float] = []
    end = time.perf_counter() + dur

    async def one_stream(s: int) -> None:
        sent: deque[float] = deque()  # replies come back in request order
        sem = asyncio.Semaphore(window)

        async def gen() -> AsyncIterator[router_pb2.RouteRequest]:
            i = 0
            while time.perf_counter() < end:
                await sem.acquire()
                r = reqs[i % len(reqs)]
                rid = f"{tag}-{s}-{i}"
                out = router_pb2.RouteRequest()
                if not empty:  # empty: no request_id, answered with an INVALID_ARGUMENT reply
                    out.CopyFrom(r)  # a C-level copy; rebuilding from token_ids costs ~50 us
                    out.request_id = rid
                sent.append(time.perf_counter())
                i += 1
                yield out

        async for _resp in stub.RouteStream(gen()):
            lat.append(time.perf_counter() - sent.popleft())
            sem.release()

    await asyncio.gather(*(one_stream(s) for s in range(n)))
    return lat


async def _client(target: str, kind: str, params: dict[str, Any], tokens: list[list[int]],
                  tag: str) -> tuple[list[float], float]:
    reqs = [router_pb2.RouteRequest(token_ids=t) for t in tokens]
    async with grpc.aio.insecure_channel(target) as ch:
        router = router_pb2_grpc.RouterStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)

        async def empty(_i: int) -> Any:
            return await health.Check(health_pb2.HealthCheckRequest())

        async def route(i: int) -> Any:
            out = router_pb2.RouteRequest()
            out.CopyFrom(reqs[i % len(reqs)])
            out.request_id = f"{tag}-{i}"
            return await router.Route(out)

        t0 = time.perf_counter()
        dur = params["duration_s"]
        if kind == "empty":
            lat = await _closed(empty, params["concurrency"], dur)
        elif kind == "route":
            lat = await _closed(route, params["concurrency"], dur)
        elif kind == "route_rate":
            lat = await _open(route, params["rate"], dur)
        else:
            lat = await _streams(router, reqs, params["streams"], params["window"], dur, tag,
                                 empty=kind == "stream_empty")
        return lat, time.perf_counter() - t0


def _client_proc(args: tuple[str, str, dict[str, Any], list[list[int]], str],
                 ) -> tuple[list[float], float]:
    return asyncio.run(_client(*args))


def measure(target: str, kind: str, params: dict[str, Any], tokens: list[list[int]],
            procs: int, tag: str) -> dict[str, float]:
    """Run one load shape from ``procs`` client processes; merged latency summary."""
    ctx = multiprocessing.get_context("spawn")
    jobs = [(target, kind, params, tokens, f"{tag}-p{p}") for p in range(procs)]
    with ctx.Pool(procs) as pool:
        results = pool.map(_client_proc, jobs)
    lat = [x for r, _ in results for x in r]
    wall = max(w for _, w in results)
    return _summary(lat, wall)


