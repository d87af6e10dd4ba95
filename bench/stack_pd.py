"""Disaggregated replay through the real stack (``--mode stack --prefill-nodes P``, ``-D``).

The fleet is :class:`bench.stack_fleet.StackFleet` with a role per engine (agents register
``--role prefill|decode``). Each request, at its compressed arrival time, does what a
disaggregated proxy does, the vLLM way: ``Router.Route`` (the router sees prefill and decode
nodes and answers a pair) → ``POST /v1/completions`` on the prefill engine with ``max_tokens=1``
and ``kv_transfer_params.do_remote_decode`` → ``POST /v1/completions`` on the decode engine with
the ``kv_transfer_params`` the prefill engine answered (it receives the blocks its cache lacks,
stores and publishes them) → ``Router.Complete``; the prefill half is released
(``CompleteRequest.prefill_only``) as soon as the prefill engine answers, as
:func:`bench.sim.pd_replay.simulate_pd` does. Numbers come from the engines' records: the
prefill record gives the prefill queue, prefill time and cached tokens, the decode record the
transfer and first token; the hand-over between them (response, then the next request) is
measured by the client and converted to model seconds. The prefill half's return lag (its
engine's answer to the router acknowledging the release: the client's hop and the ``Complete``
RPC, which a proxy that is itself the router, like vllm-router, does not have) is each row's
``return_lag_ms``; ``--sim-runs`` replays it as ``complete_lag_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench.dispatch import dispatch_open_loop
from bench.prompts import JSON_HEADERS, Prompt, json_body, prepare
from bench.results import PolicyRun
from bench.sim.pd_replay import PdRun
from bench.stack_fleet import FleetSpec
from bench.stack_replay import _arrival_lags, _stats
from bench.workloads.base import TraceRequest, Workload
from kvroute.v1 import router_pb2, router_pb2_grpc
from router_service.gateway.pd import ASK_PREFILL


@dataclass
class _Pair:
    prefill: str = ""
    decode: str = ""
    predicted_transfer: int = 0
    handoff_s: float = math.nan
    """Wall seconds between the prefill response and the decode request's send."""
    released_at: float = math.nan
    """Client wall clock (``perf_counter``) when the router had acknowledged the prefill
    half's release (``Complete`` with ``prefill_only``)."""
    error: str = ""


async def _release_prefill(stub: router_pb2_grpc.RouterAsyncStub, request_id: str,
                           out: _Pair) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stub.Complete(router_pb2.CompleteRequest(
            request_id=request_id, success=True, prefill_only=True), timeout=10)
        out.released_at = time.perf_counter()


async def _one(req: TraceRequest, prompt: Prompt, route_msg: router_pb2.RouteRequest,
               model: str, stub: router_pb2_grpc.RouterAsyncStub, http: aiohttp.ClientSession,
               urls: dict[str, str], out: _Pair) -> None:
    ok = False
    released: asyncio.Task[None] | None = None
    try:
        d = await stub.Route(route_msg, timeout=30)
        out.prefill, out.decode = d.node_id, d.decode_node_id or d.node_id
        out.predicted_transfer = d.transfer_blocks
        body = json_body({"model": model, "max_tokens": 1, "stream": False,
                          "kv_transfer_params": ASK_PREFILL, "user": f"{req.request_id}#p"},
                         "prompt", prompt)
        async with http.post(f"{urls[out.prefill]}/v1/completions", data=body,
                             headers=JSON_HEADERS) as resp:
            data: dict[str, Any] = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"prefill engine {resp.status}: {data}")
        t_hand = time.perf_counter()
        # the prefill half is done (as in the sim, RouterCore.complete_prefill): release the
        # prefill node's load while the decode request goes out
        released = asyncio.create_task(_release_prefill(stub, req.request_id, out))
        body = json_body({"model": model, "max_tokens": max(1, req.output_tokens),
                          "kv_transfer_params": data.get("kv_transfer_params") or {},
                          "user": f"{req.request_id}#d"}, "prompt", prompt)
        out.handoff_s = time.perf_counter() - t_hand
        async with http.post(f"{urls[out.decode]}/v1/completions", data=body,
                             headers=JSON_HEADERS) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"decode engine {resp.status}: {data}")
        ok = True
    except grpc.aio.AioRpcError as exc:
        out.error = f"route: {exc.code().name}: {exc.details()}"
    except (aiohttp.ClientError, TimeoutError, KeyError, RuntimeError) as exc:
        out.error = f"engine: {exc!r}"
    finally:
        if released is not None:
            await released
        if out.prefill:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Complete(router_pb2.CompleteRequest(
                    request_id=req.request_id, success=ok), timeout=10)


async def replay_stack_pd(workload: Workload, policy: str, decode_policy: str,
                          router_target: str, engine_urls: dict[str, str], prefill_nodes: int,
                          model: str, time_scale: float, prefill_tokens_per_s: float,
                          progress: Callable[[int], None] | None = None,
                          prompts: list[Prompt] | None = None) -> PdRun:
    """Replay ``workload`` disaggregated; the engines' records make the run."""
    node_ids = sorted(engine_urls, key=lambda n: (not n.startswith("prefill"), n))
    n_req = len(workload.requests)
    run = PolicyRun(f"stack-pd:{policy}/{decode_policy}", node_ids, n_req)
    run.init_requests(n_req)
    nan = math.nan
    pd = PdRun(run, prefill_nodes, [-1] * n_req, [0] * n_req, [nan] * n_req, [nan] * n_req,
               [nan] * n_req, [0] * n_req, [0] * n_req)
    prompts = prompts if prompts is not None else prepare(workload)
    outs = [_Pair() for _ in workload.requests]
    msgs = []
    for r, p in zip(workload.requests, prompts, strict=True):
        m = router_pb2.RouteRequest(request_id=r.request_id, model=model, token_ids=p.tokens,
                                    policy=policy, max_output_tokens=r.output_tokens,
                                    disaggregated=True, decode_policy=decode_policy)
        if r.session_key:
            m.session_id = r.session_key
        msgs.append(m)
    t_wall = time.perf_counter()
    async with grpc.aio.insecure_channel(router_target) as channel, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=600),
            connector=aiohttp.TCPConnector(limit=512)) as http:
        stub = router_pb2_grpc.RouterStub(channel)
        for url in engine_urls.values():
            async with http.post(f"{url}/kvroute/stats/reset") as resp:
                resp.raise_for_status()
        # the schedule's origin: after the channel, the session and the resets (their wall time
        # would otherwise be added to every return lag), as bench.stack_replay does
        start = time.perf_counter()

        def send(i: int) -> Coroutine[Any, Any, None]:
            return _one(workload.requests[i], prompts[i], msgs[i], model, stub, http,
                        engine_urls, outs[i])

        await dispatch_open_loop(workload.requests, time_scale, send, progress, start)
        stats = {n: await _stats(http, u) for n, u in engine_urls.items()}
    run.wall_s = time.perf_counter() - t_wall  # the whole replay, setup and stats included
    _fill(pd, workload, outs, stats, node_ids, time_scale, prefill_tokens_per_s, start)
    return pd


def _fill(pd: PdRun, workload: Workload, outs: list[_Pair],
          stats: dict[str, dict[str, Any]], node_ids: list[str], time_scale: float,
          rate: float, start: float) -> None:
    """Fill ``pd`` from the engines' ``stats`` records and the client's ``outs``; ``start`` is
    the ``perf_counter`` the open-loop dispatch scheduled arrivals from (request ``i`` is sent
    at ``start + arrival_s * time_scale``)."""
    run = pd.run
    recs: dict[str, dict[str, Any]] = {}
    for st in stats.values():
        for rec in st.get("records", []):
            recs[str(rec.get("request_id"))] = rec
    index = {n: i for i, n in enumerate(node_ids)}
    skew = [math.nan] * len(outs)  # prefill engine arrival - schedule
    pre_e2e = [math.nan] * len(outs)  # prefill engine arrival -> its answer (model s)
    for i, (req, out) in enumerate(zip(workload.requests, outs, strict=True)):
        run.arrival_s[i] = req.arrival_s
        run.prompt_tokens[i] = req.prompt_tokens
        p, d = recs.get(f"{req.request_id}#p"), recs.get(f"{req.request_id}#d")
        if out.error or p is None or d is None:
            run.failed += 1
            if out.error and len(run.notes) < 5:
                run.notes.append(f"{req.request_id}: {out.error}")
            continue
        run.node[i], pd.decode_node[i] = index[out.prefill], index[out.decode]
        run.prompt_tokens[i] = int(p["prompt_tokens"])
        run.cached_tokens[i] = int(p["cached_tokens"])
        skew[i] = float(p["arrival"]) - req.arrival_s
        pd.predicted_transfer_blocks[i] = out.predicted_transfer
        pre_queue = float(p["first_token_at"]) - float(p["arrival"])
        pre_e2e[i] = float(p["finished_at"]) - float(p["arrival"])
        prefill = (run.prompt_tokens[i] - run.cached_tokens[i]) / rate
        pd.prefill_s[i] = min(prefill, pre_queue)
        hand = (0.0 if math.isnan(out.handoff_s) else out.handoff_s) / time_scale
        dec_first = float(d["first_token_at"]) - float(d["arrival"])
        dec_adm = float(d["admitted_at"]) - float(d["arrival"])
        pd.transfer_s[i] = max(0.0, dec_first - dec_adm)
        pd.queue_s[i] = (pre_queue - pd.prefill_s[i]) + dec_adm + hand
        pd.decode_held_tokens[i] = int(d["cached_tokens"])
        pd.transfer_blocks[i] = int(d.get("transfer_blocks", 0))
        run.ttft_s[i] = pre_queue + hand + dec_first
        run.e2e_s[i] = pre_queue + hand + float(d["finished_at"]) - float(d["arrival"])
        run.t_end_s = max(run.t_end_s, req.arrival_s + run.e2e_s[i])
    lags = _arrival_lags(run.node, skew, pd.prefill_nodes)  # at the prefill engines
    run.arrival_lag_by_request = lags
    run.arrival_lag_s = [v for v in lags if not math.isnan(v)]
    # the prefill half's return lag: its engine's answer -> the router acknowledging the
    # release (what --mode sim models as complete_lag_s), on the arrival lags' convention.
    # The engine's answer is placed at arrival + arrival lag + prefill e2e; arrival lags are
    # per engine relative to its earliest, so this lag also holds that engine's minimum
    # arrival lag (about one Route RTT): an upper bound by that much.
    run.return_lag_by_request = [
        (o.released_at - start) / time_scale - (req.arrival_s + lag + e2e)
        for req, o, lag, e2e in zip(workload.requests, outs, lags, pre_e2e, strict=True)]
    run.return_lag_s = [v for v in run.return_lag_by_request if not math.isnan(v)]


STACK_PD_STRATEGIES = ("kv_aware/kv_aware", "kv_aware/least_loaded", "round_robin/round_robin")
"""Strategies the router itself serves (prefill policy/decode choice)."""


def run_stack_pd(workdir: Path, spec: FleetSpec, workload: Workload, prefill_nodes: int,
                 strategies: list[str], progress: Callable[[int], None] | None = None,
                 peers: list[str] | None = None,
                 gateway_decode_policy: str = "kv_aware",
                 reverse: bool = False) -> list[PdRun]:
    """One fleet (P prefill + D decode engines with agents, registry, router, etcd), every
    strategy replayed on emptied caches; then, when ``spec.gateway`` is set, the workload
    through kvroute's OpenAI gateway, which orchestrates each pair in-process
    (:mod:`bench.stack_pd_gateway`; fresh routing state; row
    ``gateway-pd:{spec.default_policy}/{gateway_decode_policy}``, the decode choice the
    gateway was started with, ``--pd-decode-policy``); then each
    ``vllm-router:PREFILL/DECODE`` or ``sglang-router:PREFILL/DECODE`` peer in front of the
    same engines (:mod:`bench.stack_pd_peer`, :mod:`bench.stack_pd_sglang`). ``reverse``
    replays them in the opposite order (``--repeat`` alternates it: ABBA, so with an even
    number of runs the order a row ran in cancels in the mean); the runs come back in the
    order above either way, each with a note of its place in the replay order."""
    from bench.stack_backend import StackBackend
    from bench.stack_pd_gateway import replay_gateway_pd
    from bench.stack_pd_peer import replay_vllm_router_pd
    from bench.stack_pd_sglang import replay_sglang_router_pd

    with StackBackend(workdir, spec) as stack:
        prompts = prepare(workload)
        engines = stack.fleet.engines

        def router_row(pre: str, dec: str) -> PdRun:
            urls = asyncio.run(stack.reset_fleet())
            return asyncio.run(replay_stack_pd(
                workload, pre, dec, stack.fleet.router_target, urls, prefill_nodes,
                spec.model, spec.time_scale, spec.prefill_tokens_per_s, progress, prompts))

        def gateway_row() -> PdRun:
            asyncio.run(stack.reset_fleet())
            label = f"gateway-pd:{spec.default_policy}/{gateway_decode_policy}"
            return replay_gateway_pd(stack, workload, prefill_nodes, prompts, label, progress)

        def peer_row(name: str, pre: str, dec: str) -> PdRun:
            replay = (replay_sglang_router_pd if name == "sglang-router"
                      else replay_vllm_router_pd)
            asyncio.run(stack.reset_fleet())
            return asyncio.run(replay(
                workload, pre, dec, engines[:prefill_nodes], engines[prefill_nodes:],
                spec.model, workdir / "peers", spec.time_scale, spec.prefill_tokens_per_s,
                prompts, progress))

        rows: list[Callable[[], PdRun]] = []
        for strat in strategies:
            pre, _, dec = strat.partition("/")
            rows.append(functools.partial(router_row, pre, dec))
        if spec.gateway:
            rows.append(gateway_row)
        for peer in peers or []:
            name, _, pair = peer.partition(":")
            pre, _, dec = pair.partition("/")
            rows.append(functools.partial(peer_row, name, pre, dec))
        order = range(len(rows))[::-1] if reverse else range(len(rows))
        done: dict[int, PdRun] = {}
        for place, i in enumerate(order, 1):
            done[i] = rows[i]()
            done[i].run.notes.append(f"replayed {place} of {len(rows)} on this fleet")
    return [done[i] for i in range(len(rows))]
