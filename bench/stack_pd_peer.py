"""vllm-router 0.1.17 in its disaggregated mode in front of the same P+D engine_sim fleet.

``vllm-router --vllm-pd-disaggregation --prefill URL... --decode URL... --prefill-policy P
--decode-policy D`` orchestrates each request itself the vLLM way (prefill with ``max_tokens=1``
and ``kv_transfer_params.do_remote_decode``, then decode with the prefill answer's
``kv_transfer_params``), which engine_sim speaks (:mod:`engine_sim.kv_transfer`). Its
``kv_aware`` prefill policy reads the prefill engines' ZMQ KV events (``--pd-kv-events``; it
assumes 16-token blocks, so that policy is only offered for 16-token workloads). The replay
sends every request to the router at its compressed arrival time with ``user`` = the request id
(forwarded unchanged), and the run is built from the engines' own records exactly like
kvroute's (:mod:`bench.stack_pd`): the prefill record on a prefill engine, the decode record on
a decode engine; the router's internal hand-over is not in the TTFT (nor is kvroute's).
:func:`replay_pd_router` is the replay of any peer router in its PD mode (sglang-router's:
:mod:`bench.stack_pd_sglang`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from bench.dispatch import dispatch_open_loop
from bench.peers.base import post_json
from bench.peers.process import RouterProcess, find_executable
from bench.prompts import Prompt, json_body
from bench.results import PolicyRun
from bench.sim.pd_replay import PdRun
from bench.stack_fleet import EngineHandle
from bench.stack_replay import _arrival_lags, _stats
from bench.workloads.base import Workload
from kvroute.procs import free_port


def vllm_router_argv(exe: str, port: int, prefill: list[EngineHandle],
                     decode: list[EngineHandle], prefill_policy: str,
                     decode_policy: str) -> list[str]:
    """The router's command line."""
    argv = [exe, "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation"]
    for e in prefill:
        argv += ["--prefill", e.url]
    for e in decode:
        argv += ["--decode", e.url]
    argv += ["--prefill-policy", prefill_policy, "--decode-policy", decode_policy,
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    if prefill_policy == "kv_aware":
        for e in prefill:
            argv += ["--pd-kv-events", f"{e.url}=tcp://127.0.0.1:{e.ready['events_port']}"]
    return argv


async def replay_vllm_router_pd(workload: Workload, prefill_policy: str, decode_policy: str,
                                prefill: list[EngineHandle], decode: list[EngineHandle],
                                model: str, workdir: Path, time_scale: float,
                                prefill_tokens_per_s: float, prompts: list[Prompt],
                                progress: Callable[[int], None] | None = None) -> PdRun:
    """One replay through a fresh vllm-router PD process (caches already emptied)."""
    if prefill_policy == "kv_aware" and workload.block_size != 16:
        raise ValueError("vllm-router's --pd-kv-events assumes 16-token blocks; this workload "
                         f"uses {workload.block_size}")
    exe = find_executable("vllm-router")
    if exe is None:
        raise RuntimeError("vllm-router is not installed (pip install 'kvroute[peers]')")
    port = free_port()
    proc = RouterProcess(f"vllm-router-pd-{prefill_policy}-{decode_policy}",
                         vllm_router_argv(exe, port, prefill, decode, prefill_policy,
                                          decode_policy), port, workdir)

    def body(i: int) -> tuple[str, bytes]:
        r = workload.requests[i]
        return "/v1/completions", json_body({"model": model,
                                             "max_tokens": max(1, r.output_tokens),
                                             "user": r.request_id}, "prompt", prompts[i])

    return await replay_pd_router(proc, f"vllm-router-pd:{prefill_policy}/{decode_policy}",
                                  workload, prefill, decode, body, time_scale,
                                  prefill_tokens_per_s, progress)


class PdFront(Protocol):
    """A router in front of the P+D fleet: started and stopped around the replay."""

    @property
    def base(self) -> str:
        """Its ``http://host:port``."""
        ...

    def start(self) -> object:
        """Start it (return once it serves)."""
        ...

    def stop(self) -> object:
        """Stop it."""
        ...


async def replay_pd_router(proc: PdFront, name: str, workload: Workload,
                           prefill: list[EngineHandle], decode: list[EngineHandle],
                           body: Callable[[int], tuple[str, bytes]], time_scale: float,
                           prefill_tokens_per_s: float,
                           progress: Callable[[int], None] | None = None) -> PdRun:
    """Start ``proc`` (a peer router in its PD mode), send every request at its compressed
    arrival time (``body(i)`` = path and body; the request id must reach both engines'
    records), stop it, and build the run from the engines' records."""
    proc.start()
    engines = [*prefill, *decode]
    node_ids = [e.node_id for e in engines]
    n = len(workload.requests)
    run = PolicyRun(name, node_ids, n)
    run.init_requests(n)
    nan = math.nan
    pd = PdRun(run, len(prefill), [-1] * n, [0] * n, [nan] * n, [nan] * n, [nan] * n,
               [0] * n, [0] * n)
    errors: list[str] = [""] * n
    t_wall = time.perf_counter()
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=600),
                connector=aiohttp.TCPConnector(limit=512)) as http:
            for e in engines:
                async with http.post(f"{e.url}/kvroute/stats/reset") as resp:
                    resp.raise_for_status()

            async def one(i: int) -> None:
                path, data = body(i)
                errors[i] = await post_json(http, proc.base + path, data)

            await dispatch_open_loop(workload.requests, time_scale,
                                     one, progress)
            stats = {e.node_id: await _stats(http, e.url) for e in engines}
    finally:
        proc.stop()
    run.wall_s = time.perf_counter() - t_wall
    _fill(pd, workload, errors, stats, node_ids, prefill_tokens_per_s)
    return pd


def _fill(pd: PdRun, workload: Workload, errors: list[str],
          stats: dict[str, dict[str, Any]], node_ids: list[str], rate: float) -> None:
    run = pd.run
    index = {nid: i for i, nid in enumerate(node_ids)}
    pre: dict[str, tuple[int, dict[str, Any]]] = {}
    dec: dict[str, tuple[int, dict[str, Any]]] = {}
    for nid, st in stats.items():
        side = pre if index[nid] < pd.prefill_nodes else dec
        for rec in st.get("records", []):
            side[str(rec.get("request_id"))] = (index[nid], rec)
    skew = [math.nan] * len(workload.requests)  # prefill engine arrival - schedule
    for i, req in enumerate(workload.requests):
        run.arrival_s[i] = req.arrival_s
        run.prompt_tokens[i] = req.prompt_tokens
        p, d = pre.get(req.request_id), dec.get(req.request_id)
        if errors[i] or p is None or d is None:
            run.failed += 1
            if len(run.notes) < 5:
                run.notes.append(f"{req.request_id}: {errors[i] or 'no engine record'}")
            continue
        (pi, pr), (di, dr) = p, d
        run.node[i], pd.decode_node[i] = pi, di
        run.prompt_tokens[i] = int(pr["prompt_tokens"])
        run.cached_tokens[i] = int(pr["cached_tokens"])
        skew[i] = float(pr["arrival"]) - req.arrival_s
        pre_t = float(pr["first_token_at"]) - float(pr["arrival"])
        pd.prefill_s[i] = min(pre_t, (run.prompt_tokens[i] - run.cached_tokens[i]) / rate)
        adm = float(dr["admitted_at"]) - float(dr["arrival"])
        first = float(dr["first_token_at"]) - float(dr["arrival"])
        pd.transfer_s[i] = max(0.0, first - adm)
        pd.transfer_blocks[i] = int(dr.get("transfer_blocks", 0))
        pd.decode_held_tokens[i] = int(dr["cached_tokens"])
        pd.queue_s[i] = pre_t - pd.prefill_s[i] + adm
        run.ttft_s[i] = pre_t + first
        run.e2e_s[i] = pre_t + float(dr["finished_at"]) - float(dr["arrival"])
        run.t_end_s = max(run.t_end_s, req.arrival_s + run.e2e_s[i])
    lags = _arrival_lags(run.node, skew, pd.prefill_nodes)  # at the prefill engines
    run.arrival_lag_by_request = lags
    run.arrival_lag_s = [v for v in lags if not math.isnan(v)]
