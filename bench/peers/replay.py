"""Replay a workload through one peer router and build the run from the engines' records.

The same driver shape as kvroute's stack replay (:mod:`bench.stack_replay`): every request is
sent at its arrival time compressed by the fleet's ``time_scale``, concurrently, with the token
ids :func:`bench.prompts.synth_tokens` makes from the trace's block hashes. Which engine
served a request, its cached tokens and its TTFT/e2e (model seconds) come from the engines'
``/kvroute/stats`` records, keyed by the request id the body carries — never from the router.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from bench.dispatch import dispatch_open_loop
from bench.peers.base import Peer
from bench.peers.engines import EngineFleet
from bench.prompts import Prompt, prepare
from bench.results import PolicyRun
from bench.stack_replay import (
    _fill,
    _Outcome,
    _reset_records,
    _stats,
    client_vs_engine_note,
)
from bench.workloads.base import Workload


async def replay_peer(workload: Workload, peer: Peer, name: str, fleet: EngineFleet,
                      progress: Callable[[int], None] | None = None,
                      prompts: list[Prompt] | None = None) -> PolicyRun:
    """Replay ``workload`` through ``peer`` (already started) on ``fleet`` (caches empty);
    ``prompts`` as :func:`bench.prompts.prepare` makes them (made here when not given)."""
    spec = fleet.spec
    urls = fleet.urls
    node_ids = sorted(urls)
    run = PolicyRun(policy=name, node_ids=node_ids, n_requests=len(workload.requests))
    run.init_requests(len(workload.requests))
    tokens = prompts if prompts is not None else prepare(workload)
    outcomes = [_Outcome() for _ in workload.requests]
    client_s = [math.nan] * len(workload.requests)
    timeout = aiohttp.ClientTimeout(total=900)
    t_wall0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=1024)) as http:
        before = {n: await _stats(http, u, records=False) for n, u in urls.items()}
        await _reset_records(http, urls)

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            res = await peer.send(http, workload.requests[i], tokens[i])
            t1 = time.perf_counter()
            client_s[i] = (t1 - t0) / spec.time_scale
            outcomes[i].t_done_s = (t1 - start) / spec.time_scale
            outcomes[i].error = res.error
            outcomes[i].predicted = res.predicted_cached_tokens

        start = time.perf_counter()
        await dispatch_open_loop(workload.requests, spec.time_scale,
                                 one, progress, start)
        stats = {n: await _stats(http, u) for n, u in urls.items()}
        for n, st in stats.items():
            st["_evicted_before"] = before[n].get("evicted_blocks", 0)
        run.notes.extend(await peer.notes(http))
    run.wall_s = time.perf_counter() - t_wall0
    dup = _attribute(workload, outcomes, stats)
    _fill(run, workload, outcomes, stats, node_ids, spec.prefill_tokens_per_s)
    run.notes.append(f"engine_sim x{spec.nodes}, time_scale {spec.time_scale}, block_size "
                     f"{spec.block_size}, cache {spec.cache_blocks} blocks/engine")
    if dup:
        run.notes.append(f"{dup} requests reached more than one engine (router retries)")
    run.notes.append(client_vs_engine_note(client_s, run.e2e_s))
    return run


def _attribute(workload: Workload, outcomes: list[_Outcome],
               stats: dict[str, dict[str, Any]]) -> int:
    """Set each outcome's node from the engine that recorded it; count duplicates."""
    seen: dict[str, list[str]] = {}
    for node, st in stats.items():
        for rec in st.get("records", []):
            seen.setdefault(str(rec.get("request_id")), []).append(node)
    dup = 0
    for req, out in zip(workload.requests, outcomes, strict=True):
        nodes = seen.get(req.request_id, [])
        if len(nodes) > 1:
            dup += 1
        if nodes:
            out.node_id = nodes[-1]
        elif not out.error:
            out.error = "no engine recorded this request"
    return dup
