"""One OpenAI request through the gateway: parse once, tokenize, decide in-process, forward.

Lifecycle of a request (``Proxy.handle``):

1. Admission: past ``--max-concurrent-requests`` -> 429 with ``Retry-After``; a body over
   ``--max-body-bytes`` -> 413. The body is parsed once (:mod:`router_service.openai_request`);
   its bytes are forwarded unchanged, so unknown fields pass through untouched.
2. ``model`` is resolved by the catalog (a LoRA adapter -> base model + adapter salt + the nodes
   that have it loaded); the prompt becomes token ids (:mod:`router_service.prompt_tokens`); the
   routing core decides in-process (no RPC).
3. The body goes to the chosen engine. A connect error or a 5xx before the first byte releases
   the slot, marks the node suspect for the router and tries the next decision with that node
   excluded (``--retries`` times; for a disaggregated pair, :mod:`router_service.gateway.pd`,
   ``--retries`` per half). After the first byte nothing is retried: the engine's bytes
   (an error included) reach the client as they were sent; SSE streams are relayed chunk by
   chunk as they arrive.
4. The core's in-flight slot is released (``complete``) on the last byte, on an engine error
   and on client disconnect (the upstream request is closed, which makes the engine abort),
   with the engine's ``usage.prompt_tokens_details.cached_tokens`` when the response carries it
   (for streams: when the client asked for ``stream_options.include_usage``).

Response headers name the serving node (``x-kvroute-node``), the policy and the predicted cached
tokens (``x-kvroute-predicted-cached-tokens``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDict

from kvroute.errors import KvrouteError
from router_service.domain import RouteDecision, RouteRequest
from router_service.gateway.metrics import GatewayMetrics
from router_service.gateway.pd import EngineAnswer, NodeFailed, PdForwarder, PdResult, send
from router_service.gateway.pd import cached_tokens as _cached_tokens
from router_service.gateway.settings import GatewaySettings
from router_service.gateway.upstream import (
    Response,
    ResponseBroken,
    Target,
    Upstream,
    UpstreamError,
)
from router_service.model_catalog import ModelCatalog
from router_service.openai_request import (
    ENDPOINT_PATHS,
    Endpoint,
    OpenAIError,
    OpenAIRequest,
    parse_bytes,
    route_request,
)
from router_service.placement import NodeState
from router_service.prompt_tokens import PromptTokens

log = logging.getLogger(__name__)

_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                  "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
_NOT_FORWARDED = _HOP | {"x-request-id", "expect"}  # the gateway answers 100-continue itself
_HTTP_OF_GRPC = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404,
                 "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


class Core(Protocol):
    """What the gateway uses of :class:`router_service.core.RouterCore`."""

    async def decide(self, req: RouteRequest) -> RouteDecision: ...
    def complete(self, request_id: str, success: bool = True,
                 cached_tokens: int | None = None) -> bool: ...
    def complete_prefill(self, request_id: str) -> bool: ...
    def mark_suspect(self, node_id: str, why: str) -> None: ...
    def known_nodes(self) -> list[NodeState]: ...
    def healthy_node_count(self, model: str | None = None) -> int: ...


DISCONNECTED = web.RequestKey("kvroute_disconnected", bool)
"""Set on a request whose client went away while its stream was being written."""


def error_response(exc: OpenAIError, headers: Mapping[str, str] | None = None) -> web.Response:
    """An OpenAI-shaped JSON error."""
    return web.Response(status=exc.status, body=exc.encoded(), headers=headers,
                        content_type="application/json")


def core_error(exc: KvrouteError) -> OpenAIError:
    """A routing-core error as the HTTP status its gRPC code maps to."""
    status = _HTTP_OF_GRPC.get(exc.code.name, 500)
    param = exc.message.split(":", 1)[0] if status == 400 and ":" in exc.message else None
    return OpenAIError(status, exc.message, param=param)


class Proxy:
    """The request path of the gateway (one per server)."""

    def __init__(self, core: Core, catalog: ModelCatalog, tokens: PromptTokens,
                 upstream: Upstream, settings: GatewaySettings,
                 metrics: GatewayMetrics) -> None:
        self.core = core
        self.catalog = catalog
        self.tokens = tokens
        self.upstream = upstream
        self.s = settings
        self.metrics = metrics
        self.scheme = "https" if settings.upstream_tls else "http"
        self.active = 0
        self._ids = itertools.count(1)
        self._id_prefix = f"gw{os.getpid():x}-{time.time_ns() % 10**9:x}-"
        self._busy_headers = {"Retry-After": str(settings.retry_after_s)}
        self._targets: dict[str, Target] = {}
        self._counted: dict[tuple[str, str], Any] = {}
        self.pd = PdForwarder(core, upstream.post, self._target, settings.pd_protocol,
                              settings.pd_bootstrap_port)

    def _target(self, address: str) -> Target:
        """The engine's host, port and TLS, parsed once per address."""
        target = self._targets.get(address)
        if target is None:
            if len(self._targets) > 4096:
                self._targets.clear()
            try:
                target = self._targets[address] = Target.parse(address, self.s.upstream_tls)
            except ValueError as exc:
                raise OpenAIError(502, f"bad engine address: {exc}") from None
        return target

    def _account(self, endpoint: str, status: str, duration_s: float) -> None:
        self.metrics.inflight.dec()
        self._count(endpoint, status)
        self.metrics.duration.observe(duration_s)

    def _count(self, endpoint: str, status: str) -> None:
        child = self._counted.get((endpoint, status))
        if child is None:
            child = self._counted[(endpoint, status)] = self.metrics.requests.labels(
                endpoint, status)
        child.inc()

    # -- entry ------------------------------------------------------------------------------
    async def handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        """Serve one ``POST /v1/completions`` or ``/v1/chat/completions``."""
        t0 = time.perf_counter()
        m = self.metrics
        if self.active >= self.s.max_concurrent_requests:
            m.rejected.labels("overloaded").inc()
            self._count(endpoint, "4xx")
            return error_response(OpenAIError(
                429, f"the gateway is serving {self.active} requests, its limit "
                     f"(--max-concurrent-requests); retry after {self.s.retry_after_s} s"),
                self._busy_headers)
        self.active += 1
        m.inflight.inc()
        status = "disconnect"
        try:
            resp = await self._serve(request, endpoint, t0)
            status = f"{resp.status // 100}xx"
            return resp
        except OpenAIError as exc:
            status = f"{exc.status // 100}xx"
            return error_response(exc)
        finally:
            if request.get(DISCONNECTED):
                status = "disconnect"
            self.active -= 1
            asyncio.get_running_loop().call_soon(self._account, endpoint, status,
                                                 time.perf_counter() - t0)

    async def _read(self, request: web.Request) -> bytes:
        limit = self.s.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            self.metrics.rejected.labels("too_large").inc()
            raise OpenAIError(413, f"request body of {request.content_length} bytes is over "
                              f"the limit of {limit} (--max-body-bytes)")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.rejected.labels("too_large").inc()
            raise OpenAIError(413, f"request body is over the limit of {limit} bytes "
                              "(--max-body-bytes)") from None

    def _engines(self, model: str, allowed: frozenset[str] | None) -> list[str]:
        return [n.address for n in self.core.known_nodes()
                if n.healthy and (not model or n.model == model)
                and (allowed is None or n.node_id in allowed)]

    async def _serve(self, request: web.Request, endpoint: Endpoint,
                     t0: float) -> web.StreamResponse:
        raw = await self._read(request)
        req = parse_bytes(endpoint, raw)
        resolved = await self.catalog.resolve(req.model)
        token_ids = await self.tokens.token_ids(
            req, resolved.model, lambda: self._engines(resolved.model, resolved.allowed))
        headers = request.headers
        rid = f"{self._id_prefix}{next(self._ids)}"
        client_rid = headers.get("x-request-id") or rid
        fwd = {k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED}
        fwd["X-Request-Id"] = client_rid
        base = route_request(req, token_ids, request_id=rid, model=resolved.model,
                             lora_name=resolved.lora_name, allowed=resolved.allowed,
                             session_id=headers.get(self.s.session_header),
                             policy=headers.get(self.s.policy_header))
        try:
            up, decision, pd = await self._connect(base, endpoint, req, raw, fwd, t0)
        except EngineAnswer as ans:  # a prefill node refused the request: relay its answer
            return web.Response(status=ans.status, body=ans.body, headers={
                "Content-Type": ans.content_type or "application/json",
                "x-request-id": client_rid})
        try:
            return await self._relay(request, req, up, decision, pd, client_rid, t0)
        finally:
            up.close()  # no-op after a full read; closes the connection (engine aborts) if not

    # -- connect with retries ---------------------------------------------------------------
    async def _decide(self, base: RouteRequest, excluded: frozenset[str]) -> RouteDecision:
        if excluded:
            from dataclasses import replace
            base = replace(base, excluded=excluded)
        try:
            return await self.core.decide(base)
        except KvrouteError as exc:
            raise core_error(exc) from None

    async def _connect(self, base: RouteRequest, endpoint: Endpoint, req: OpenAIRequest,
                       raw: bytes, fwd: dict[str, str], t0: float,
                       ) -> tuple[Response, RouteDecision, PdResult | None]:
        """Decide and send, retrying on a new decision without a node that failed before the
        first byte (a disaggregated pair goes through :class:`PdForwarder`, whose result
        comes along)."""
        excluded: frozenset[str] = frozenset()
        path = ENDPOINT_PATHS[endpoint]
        m = self.metrics
        failures = {"prefill": 0, "node": 0}  # each half of a pair gets --retries
        for attempt in itertools.count():
            decision = await self._decide(base, excluded)
            if attempt == 0:
                m.overhead.observe(time.perf_counter() - t0)
            pair = decision.split
            try:
                if pair:
                    pd = await self.pd.attempt(decision, path, req.body, fwd,
                                               failures["node"] >= self.s.retries)
                    return pd.response, decision, pd
                up = await self._attempt(decision, path, raw, fwd,
                                         failures["node"] >= self.s.retries)
                return up, decision, None
            except NodeFailed as exc:
                self.core.complete(base.request_id, success=False)
                m.upstream_errors.labels(exc.label).inc()
                self.core.mark_suspect(exc.node_id, exc.why)
                half = "prefill" if pair and exc.node_id == decision.node_id else "node"
                failures[half] += 1
                last = failures[half] > self.s.retries
                log.warning("engine %s (%s) failed before the first byte: %s%s", exc.node_id,
                            exc.address, exc.why, "" if last else "; retrying on another node")
                if last:
                    raise OpenAIError(502, f"engine {exc.node_id} ({exc.address}) "
                                      f"failed: {exc.why}") from None
                excluded = excluded | {exc.node_id}
            except BaseException as exc:
                self.core.complete(base.request_id, success=False)
                if isinstance(exc, TimeoutError):
                    raise OpenAIError(504, f"engine of {decision.node_id} did not answer "
                                      f"within {self.s.read_timeout_s} s "
                                      f"(--read-timeout-s)") from None
                raise
            m.retries.inc()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, d: RouteDecision, path: str, raw: bytes, fwd: dict[str, str],
                       last: bool) -> Response:
        """One aggregated attempt: the response head, or NodeFailed."""
        return await send(self.upstream.post, self._target(d.address), d.node_id, d.address,
                          path, fwd, raw, last)

    # -- relay ------------------------------------------------------------------------------
    def _headers(self, up: Response, d: RouteDecision, client_rid: str) -> CIMultiDict[str]:
        h = CIMultiDict((k, v) for k, v in up.headers if k.lower() not in _HOP)
        h["x-kvroute-node"] = d.node_id
        if d.disaggregated:
            h["x-kvroute-decode-node"] = d.decode_node_id
        h["x-kvroute-policy"] = d.policy
        h["x-kvroute-predicted-cached-tokens"] = str(d.expected_cached_tokens)
        h["x-request-id"] = client_rid
        return h

    async def _relay(self, request: web.Request, req: OpenAIRequest,
                     up: Response, d: RouteDecision, pd: PdResult | None, client_rid: str,
                     t0: float) -> web.StreamResponse:
        rid = d.request_id
        m = self.metrics
        headers = self._headers(up, d, client_rid)
        if up.content_type != "text/event-stream":
            try:
                body = await up.read()
            except asyncio.CancelledError:
                self.core.complete(rid, success=False)
                raise
            except (UpstreamError, TimeoutError) as exc:
                self.core.complete(rid, success=False)
                m.upstream_errors.labels("midstream").inc()
                raise OpenAIError(502, f"engine {d.node_id} failed while sending its "
                                  f"response: {type(exc).__name__}: {exc}") from None
            up.release()
            # the bookkeeping (release the slot, metrics) runs right after the response is
            # handed to aiohttp, so the client does not wait for it
            asyncio.get_running_loop().call_soon(
                self._after_body, rid, up.status < 400, body, d, pd, time.perf_counter() - t0)
            return web.Response(status=up.status, body=body, headers=headers)
        return await self._relay_stream(request, up, d, pd, headers, t0)

    async def _relay_stream(self, request: web.Request, up: Response, d: RouteDecision,
                            pd: PdResult | None, headers: CIMultiDict[str],
                            t0: float) -> web.StreamResponse:
        rid = d.request_id
        out = web.StreamResponse(status=up.status, headers=headers)
        cached: int | None = None
        tail = b""
        first = True
        ok = False
        try:
            await out.prepare(request)
            async for chunk in up.iter_chunks():
                if first:
                    self.metrics.first_byte.observe(time.perf_counter() - t0)
                    first = False
                try:
                    await out.write(chunk)
                except (ConnectionError, RuntimeError):  # client gone: stop, close upstream
                    request[DISCONNECTED] = True
                    self.core.complete(rid, success=False)
                    return out
                window = tail + chunk
                if b"cached_tokens" in window:
                    found = _cached_tokens(window)
                    cached = found if found is not None else cached
                tail = chunk[-64:]
            ok = up.status < 400
            up.release()
        except (UpstreamError, TimeoutError) as exc:
            # after the first byte nothing is retried: the client sees the stream end abruptly
            self.metrics.upstream_errors.labels("midstream").inc()
            log.warning("engine %s failed mid-stream: %s", d.node_id, exc)
            self.core.complete(rid, success=False)
            if isinstance(exc, ResponseBroken):
                self.core.mark_suspect(d.node_id, f"connection lost mid-stream: {exc}")
            if request.transport is not None:
                request.transport.close()
            return out
        except BaseException:  # client gone (cancelled or write failed): release, close upstream
            self.core.complete(rid, success=False)
            raise
        self._complete(rid, ok, cached, d, pd)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write_eof()
        return out

    def _after_body(self, rid: str, ok: bool, body: bytes, d: RouteDecision,
                    pd: PdResult | None, first_byte_s: float) -> None:
        self.metrics.first_byte.observe(first_byte_s)
        self._complete(rid, ok, _cached_tokens(body), d, pd)

    def _complete(self, rid: str, ok: bool, cached: int | None, d: RouteDecision,
                  pd: PdResult | None) -> None:
        if pd is not None:  # a split pair: what the prefill node served (the prediction's),
            # once its answer is in (SGLang: it may come after the decode's end)
            pd.when_prefilled(lambda pre: self._completed(rid, ok, pre, d))
        else:
            self._completed(rid, ok, cached, d)

    def _completed(self, rid: str, ok: bool, cached: int | None, d: RouteDecision) -> None:
        self.core.complete(rid, success=ok, cached_tokens=cached)
        if cached is not None:
            self.metrics.cached_tokens.inc(cached)
            self.metrics.predicted_tokens.inc(d.expected_cached_tokens)
