"""Replay a workload through a running :class:`bench.stack_fleet.StackFleet` (``--mode stack``).

Each request, at its arrival time compressed by the fleet's ``time_scale``: ``Router.Route`` with
the prompt's token ids (the router hashes them) → ``POST /v1/completions`` on the chosen engine →
``Router.Complete`` with the cached tokens the engine reported. With a gateway URL the same body
goes to the OpenAI gateway instead (``kvroute serve gateway``: it decides in-process, forwards and
completes; the policy travels in the ``x-kvroute-policy`` header, the node comes back in
``x-kvroute-node``). Requests run concurrently, as a
gateway would send them. Afterwards the engines' own records (``/kvroute/stats``) give prompt
tokens, cached tokens and the engine-side arrival, first-token and finish times in model seconds:
every number in the result comes from the engines, never from the router.

Workloads are stored as canonical block hashes (Mooncake ``hash_ids``); the stack needs tokens,
so :func:`bench.prompts.synth_tokens` turns each block hash into ``block_size`` deterministic token
ids. Equal hashes give equal tokens and, because the hashes are prefix-chained, equal prefixes —
so the sharing structure the trace records is exactly what the engines see. Payloads are encoded
before the clock starts (:mod:`bench.prompts`), so the timed loop only does I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import grpc

from bench.dispatch import dispatch_open_loop
from bench.prompts import JSON_HEADERS, Prompt, json_body, prepare
from bench.results import PolicyRun
from bench.workloads.base import TraceRequest, Workload
from kvroute.v1 import router_pb2, router_pb2_grpc


@dataclass
class _Outcome:
    node_id: str = ""
    predicted: int = 0
    cached: int = 0
    error: str = ""
    client_s: float = math.nan
    """Route call to engine response, as the client saw it (model seconds)."""
    degraded: bool = False
    """The router decided without placement data (registry unreachable)."""
    t_route_s: float = math.nan
    """Trace time the Route call was made (for fault windows)."""
    t_done_s: float = math.nan
    """Trace time the client had the engine's response (for the return lag)."""
    front: int = -1
    """The replica (router or gateway) the request went to."""
    route_sent_wall_s: float = math.nan
    route_answered_wall_s: float = math.nan
    """Wall seconds after the replay's start the Route was sent / answered (Router API)."""


class ReplayHook(Protocol):
    """Something that runs next to a replay and looks at its outcomes (fault injection)."""

    async def during(self, t0: float) -> None:
        """Runs concurrently with the replay; ``t0`` is its ``time.perf_counter()`` start."""
        ...

    def after(self, run: PolicyRun, outcomes: Sequence[_Outcome]) -> None:
        """Called with the finished run and every request's outcome."""
        ...

    @property
    def dead_nodes(self) -> set[str]:
        """Nodes the hook killed for good (later replays run without them)."""
        ...

    @property
    def replays(self) -> int:
        """Replays per policy (a fault run first replays without faults as its baseline);
        the last one is the policy's result."""
        ...


def _as_is(payload: bytes) -> bytes:
    return payload


def route_payloads(workload: Workload, prompts: list[Prompt], model: str,
                   policy: str) -> list[bytes]:
    """Every request's serialized ``RouteRequest`` (encoded before the replay's clock starts)."""
    out: list[bytes] = []
    for req, prompt in zip(workload.requests, prompts, strict=True):
        msg = router_pb2.RouteRequest(request_id=req.request_id, model=model,
                                      token_ids=prompt.tokens, policy=policy,
                                      max_output_tokens=req.output_tokens)
        if req.session_key:
            msg.session_id = req.session_key
        out.append(msg.SerializeToString())
    return out


async def _one(req: TraceRequest, prompt: Prompt, route_bytes: bytes, model: str,
               route: Any, stub: router_pb2_grpc.RouterAsyncStub, http: aiohttp.ClientSession,
               urls: dict[str, str], out: _Outcome, time_scale: float,
               t_start: float = math.nan) -> None:
    t0 = time.perf_counter()
    out.route_sent_wall_s = t0 - t_start
    out.t_route_s = out.route_sent_wall_s / time_scale
    try:
        decision = await route(route_bytes, timeout=30)
    except grpc.aio.AioRpcError as exc:
        out.error = f"route: {exc.code().name}: {exc.details()}"
        return
    out.route_answered_wall_s = time.perf_counter() - t_start
    out.node_id, out.predicted = decision.node_id, decision.expected_cached_tokens
    out.degraded = decision.degraded
    body = json_body({"model": model, "max_tokens": max(1, req.output_tokens),
                      "user": req.request_id}, "prompt", prompt)
    ok = False
    try:
        async with http.post(f"{urls[decision.node_id]}/v1/completions", data=body,
                             headers=JSON_HEADERS) as resp:
            data: dict[str, Any] = await resp.json()
            if resp.status != 200:
                out.error = f"engine {resp.status}: {data.get('message', data)}"
            else:
                usage = data.get("usage") or {}
                details = usage.get("prompt_tokens_details") or {}
                out.cached = int(details.get("cached_tokens") or 0)
                t1 = time.perf_counter()
                out.client_s = (t1 - t0) / time_scale
                out.t_done_s = (t1 - t_start) / time_scale
                ok = True
    except (aiohttp.ClientError, TimeoutError, KeyError) as exc:
        out.error = f"engine: {exc!r}"
    finally:
        # On failure the router's in-flight timeout releases the request.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Complete(router_pb2.CompleteRequest(
                request_id=req.request_id, success=ok, cached_tokens=out.cached), timeout=10)


async def _one_gateway(req: TraceRequest, prompt: Prompt, policy: str, model: str,
                       gateway_url: str, http: aiohttp.ClientSession, out: _Outcome,
                       time_scale: float, t_start: float = math.nan) -> None:
    t0 = time.perf_counter()
    body = json_body({"model": model, "max_tokens": max(1, req.output_tokens),
                      "user": req.request_id}, "prompt", prompt)
    headers = {**JSON_HEADERS, "x-kvroute-policy": policy, "x-request-id": req.request_id}
    if req.session_key:
        headers["x-session-id"] = req.session_key
    try:
        async with http.post(f"{gateway_url}/v1/completions", data=body,
                             headers=headers) as resp:
            data: dict[str, Any] = await resp.json()
            out.node_id = resp.headers.get("x-kvroute-node", "")
            out.predicted = int(resp.headers.get("x-kvroute-predicted-cached-tokens", "0"))
            if resp.status != 200:
                out.error = f"gateway {resp.status}: {data.get('error', data)}"
                return
            details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
            out.cached = int(details.get("cached_tokens") or 0)
            t1 = time.perf_counter()
            out.client_s = (t1 - t0) / time_scale
            out.t_done_s = (t1 - t_start) / time_scale
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
        out.error = f"gateway: {exc!r}"


async def replay_stack(workload: Workload, policy: str, router_target: str | Sequence[str],
                       engine_urls: dict[str, str], model: str, time_scale: float,
                       prefill_tokens_per_s: float,
                       progress: Callable[[int], None] | None = None,
                       prompts: list[Prompt] | None = None,
                       hook: ReplayHook | None = None,
                       gateway_url: str | Sequence[str] | None = None,
                       spread: str = "random", seed: int = 0) -> PolicyRun:
    """Replay ``workload`` under ``policy`` and build the run from the engines' records
    (through the gateway at ``gateway_url`` when given, else Route + engine + Complete).

    ``prompts``: the workload's prepared prompts (:func:`bench.prompts.prepare`; made here when
    not given — pass them to reuse them across policies). ``hook`` (fault injection) runs next
    to the replay and sees every outcome after.

    Several router targets (or gateway URLs) are replicas behind a Kubernetes Service: each
    request goes to one of them as the Service would send a new connection (``spread``
    ``random``: kube-proxy's iptables mode; ``round_robin``: IPVS ``rr``); a Route's Complete
    is a separate call and is spread the same way, so it often lands on another replica than
    the Route (the shared view releases it everywhere).
    """
    from bench.sim.replicas import ReplicaSettings, Spreader

    targets = [router_target] if isinstance(router_target, str) else list(router_target)
    gateways = [gateway_url] if isinstance(gateway_url, str) else list(gateway_url or [])
    fronts = Spreader(ReplicaSettings(routers=max(1, len(gateways) or len(targets)),
                                      spread=spread), seed)
    completes = Spreader(ReplicaSettings(routers=max(1, len(targets)), spread=spread), seed + 1)
    node_ids = sorted(engine_urls)
    run = PolicyRun(policy=policy, node_ids=node_ids, n_requests=len(workload.requests))
    run.init_requests(len(workload.requests))
    prompts = prompts if prompts is not None else prepare(workload)
    route_bytes = route_payloads(workload, prompts, model, policy)
    outcomes = [_Outcome() for _ in workload.requests]
    timeout = aiohttp.ClientTimeout(total=600)
    t_wall0 = time.perf_counter()
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=512)) as http:
        stubs = [router_pb2_grpc.RouterStub(ch) for ch in channels]
        routes = [ch.unary_unary(  # takes the pre-serialized request bytes as they are
            "/kvroute.v1.Router/Route", request_serializer=_as_is,
            response_deserializer=router_pb2.RouteResponse.FromString) for ch in channels]
        before = {n: await _stats(http, u, records=False) for n, u in engine_urls.items()}
        await _reset_records(http, engine_urls)
        start = time.perf_counter()
        hooked = asyncio.create_task(hook.during(start)) if hook is not None else None

        def send(i: int) -> Coroutine[Any, Any, None]:
            req, front = workload.requests[i], fronts.pick()
            outcomes[i].front = front
            if gateways:
                return _one_gateway(req, prompts[i], policy, model, gateways[front], http,
                                    outcomes[i], time_scale, start)
            return _one(req, prompts[i], route_bytes[i], model, routes[front],
                        stubs[completes.pick()], http, engine_urls, outcomes[i], time_scale,
                        start)

        await dispatch_open_loop(workload.requests, time_scale, send,
                                 progress, start)
        if hooked is not None:
            await hooked
        stats = {n: await _stats(http, u, gone_ok=hook is not None)
                 for n, u in engine_urls.items()}
        for n, st in stats.items():
            if st:  # (empty: a fault killed the engine)
                st["_evicted_before"] = before[n].get("evicted_blocks", 0)
    for ch in channels:
        await ch.close(None)
    run.wall_s = time.perf_counter() - t_wall0
    _fill(run, workload, outcomes, stats, node_ids, prefill_tokens_per_s)
    run.notes.append(client_vs_engine_note([o.client_s for o in outcomes], run.e2e_s))
    if not gateways:
        run.route_front = [o.front for o in outcomes]
        run.route_sent_wall_s = [o.route_sent_wall_s for o in outcomes]
        run.route_answered_wall_s = [o.route_answered_wall_s for o in outcomes]
    if hook is not None:
        hook.after(run, outcomes)
    return run


async def _reset_records(http: aiohttp.ClientSession, urls: dict[str, str]) -> None:
    for url in urls.values():
        async with http.post(f"{url}/kvroute/stats/reset") as resp:
            resp.raise_for_status()


async def reset_caches(urls: dict[str, str]) -> None:
    """Empty every engine's prefix cache (vLLM's ``/reset_prefix_cache``; engines idle)."""
    async with aiohttp.ClientSession() as http:
        for url in urls.values():
            async with http.post(f"{url}/reset_prefix_cache") as resp:
                resp.raise_for_status()


async def _stats(http: aiohttp.ClientSession, url: str, records: bool = True,
                 gone_ok: bool = False) -> dict[str, Any]:
    """An engine's stats; ``gone_ok``: an engine a fault killed has none (its requests count
    as failed)."""
    try:
        async with http.get(f"{url}/kvroute/stats", params={"records": "1" if records else "0"}
                            ) as resp:
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data
    except aiohttp.ClientConnectorError:
        if gone_ok:
            return {}
        raise


def _fill(run: PolicyRun, workload: Workload, outcomes: list[_Outcome],
          stats: dict[str, dict[str, Any]], node_ids: list[str],
          prefill_tokens_per_s: float) -> None:
    records: dict[str, dict[str, Any]] = {}
    for st in stats.values():
        for rec in st.get("records", []):
            records[str(rec.get("request_id"))] = rec
    index = {n: i for i, n in enumerate(node_ids)}
    busy = [0.0] * len(node_ids)
    t_end = 0.0
    skew: list[float] = [math.nan] * len(workload.requests)  # engine arrival - schedule
    for i, (req, out) in enumerate(zip(workload.requests, outcomes, strict=True)):
        run.arrival_s[i] = req.arrival_s
        run.prompt_tokens[i] = req.prompt_tokens
        run.predicted_cached_tokens[i] = out.predicted
        rec = records.get(req.request_id)
        if out.error or rec is None or out.node_id not in index:
            run.failed += 1
            if out.error and len(run.notes) < 5:
                run.notes.append(f"{req.request_id}: {out.error}")
            continue
        run.node[i] = index[out.node_id]
        run.prompt_tokens[i] = int(rec.get("prompt_tokens", req.prompt_tokens))
        run.cached_tokens[i] = int(rec.get("cached_tokens", out.cached))
        arrival = float(rec.get("arrival", math.nan))
        first = float(rec.get("first_token_at", math.nan))
        finish = float(rec.get("finished_at", math.nan))
        run.ttft_s[i] = first - arrival
        run.e2e_s[i] = finish - arrival
        skew[i] = arrival - req.arrival_s
        # Prefill work the engine did for this request (its model charges uncached tokens at
        # the configured rate), for the prefill-utilisation column.
        busy[run.node[i]] += (run.prompt_tokens[i] - run.cached_tokens[i]) / prefill_tokens_per_s
        if not math.isnan(finish):  # engine clocks start with each engine: use durations
            t_end = max(t_end, req.arrival_s + (finish - arrival))
    run.busy_s = busy
    lags = _arrival_lags(run.node, skew, len(node_ids))
    run.arrival_lag_s = [v for v in lags if not math.isnan(v)]
    run.arrival_lag_by_request = lags
    run.return_lag_by_request = [
        o.t_done_s - (req.arrival_s + lag + e2e)
        for req, o, lag, e2e in zip(workload.requests, outcomes, lags, run.e2e_s, strict=True)]
    run.return_lag_s = [v for v in run.return_lag_by_request if not math.isnan(v)]
    run.load_samples = _load_samples(run, len(node_ids))
    run.evictions = sum(int(st.get("evicted_blocks", 0)) - int(st.get("_evicted_before", 0))
                        for st in stats.values())
    run.t_end_s = t_end


def _arrival_lags(node: list[int], skew: list[float], n_nodes: int) -> list[float]:
    """Per request: engine arrival minus schedule, less the engine's smallest such value (engine
    clocks start with the engine, so only differences on one engine mean anything); NaN for a
    request no engine recorded."""
    base = [math.inf] * n_nodes
    for n, s in zip(node, skew, strict=True):
        if n >= 0 and not math.isnan(s):
            base[n] = min(base[n], s)
    return [s - base[n] if n >= 0 and not math.isnan(s) else math.nan
            for n, s in zip(node, skew, strict=True)]


def _load_samples(run: PolicyRun, n_nodes: int, samples: int = 200,
                  ) -> list[tuple[float, list[int]]]:
    """In-flight requests per node at evenly spaced times, from arrival and e2e per request."""
    spans = [(a, a + e, n) for a, e, n in zip(run.arrival_s, run.e2e_s, run.node, strict=True)
             if n >= 0 and not math.isnan(e)]
    if not spans:
        return []
    t_last = max(end for _, end, _ in spans)
    out: list[tuple[float, list[int]]] = []
    for k in range(samples + 1):
        t = t_last * k / samples
        counts = [0] * n_nodes
        for start, end, node in spans:
            if start <= t < end:
                counts[node] += 1
        out.append((t, counts))
    return out


def client_vs_engine_note(client_s: list[float], engine_s: list[float]) -> str:
    """Client-observed vs engine-recorded e2e medians (model s): queueing the engines cannot see
    (in the router, the HTTP path or the client)."""
    c = [v for v in client_s if not math.isnan(v)]
    e = [v for v in engine_s if not math.isnan(v)]
    if not c or not e:
        return "client vs engine e2e: no completed requests"
    return (f"e2e p50 seen by the client {statistics.median(c):.3f} s vs recorded by the "
            f"engines {statistics.median(e):.3f} s (model seconds)")
