"""OpenAI-compatible HTTP API of engine_sim (aiohttp), shaped like vLLM's and SGLang's servers.

- ``POST /v1/completions``: prompt as text, token ids, or a one-element list of either;
  ``max_tokens``; ``stream`` (SSE, ``stream_options.include_usage``); ``usage`` with
  ``prompt_tokens_details.cached_tokens`` measured from the cache; vLLM's disaggregated
  ``kv_transfer_params`` (:mod:`engine_sim.kv_transfer`) and SGLang's ``bootstrap_room``
  (:mod:`engine_sim.bootstrap`; the bootstrap server is ``GET /kvroute/bootstrap/rooms/{room}``).
- ``POST /v1/chat/completions``: ``messages`` rendered with a fixed ChatML-style template
  (:mod:`engine_sim.chat_api`), streaming or not, same usage.
- ``POST /v1/completions/render``: a list of ``{token_ids, ...}`` (what vllm-router cache_aware
  calls); ``POST /tokenize`` (vLLM's shape: ``prompt`` or chat ``messages`` ->
  ``{tokens, count, max_model_len}``).
- ``POST /generate``: SGLang's native endpoint (``input_ids`` or ``text``,
  ``sampling_params.max_new_tokens``), which sglang-router uses for token-id prompts.
- ``GET /v1/models``, ``/health``, ``/get_load``, ``/metrics``, ``/server_info`` and
  ``/model_info`` (and their ``get_`` forms) without a ``model_path``, so sglang-router never
  tries to download a tokenizer; ``POST /reset_prefix_cache``.
- ``GET /kvroute/stats`` (engine-side truth: ``?since=N`` for records from index N,
  ``?records=0`` for counters only), ``POST /kvroute/stats/reset`` (forget records).

The request id of a record comes from the body's ``user`` (or ``rid``) or the ``X-Request-Id``
header. A client that goes away aborts its request, streaming or not (its handler is cancelled).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine_sim import kv_transfer
from engine_sim.bootstrap import BootstrapError
from engine_sim.engine import SimEngine
from engine_sim.http_request import (
    TOKENIZER,
    BadRequest,
    client_id,
    error_response,
    int_field,
    prompt_tokens,
    read_body,
)
from engine_sim.model import RequestTooLarge, SimRequest
from engine_sim.pd_api import Half, PdHalves

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", SimEngine)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


class Api:
    """Route handlers bound to one engine."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.pd = PdHalves(engine)

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.engine.settings.model:
            raise BadRequest(f"The model `{model}` does not exist.", 404)

    def half(self, request: web.Request, body: dict[str, Any]) -> Half | None:
        """The SGLang PD half this engine runs for the request (None: not SGLang PD)."""
        try:
            return self.pd.side(request, body)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc

    async def run(self, tokens: list[int], max_tokens: int, client_id: str,
                  remote_kv: bool = False, half: Half | None = None) -> SimRequest:
        s = self.engine.settings
        if not tokens:
            raise BadRequest("prompt is empty")
        if len(tokens) > s.max_prompt_tokens:
            raise BadRequest(f"prompt has {len(tokens)} tokens; the limit is "
                             f"{s.max_prompt_tokens} (--max-prompt-tokens)")
        waited = 0.0
        if half is not None and half.prefill:
            max_tokens = 1  # SGLang's prefill server stops after the prefill
        elif half is not None:  # decode half: the KV comes from the prefill engine
            try:
                waited = await self.pd.receive(half, len(tokens))
            except BootstrapError as exc:
                raise BadRequest(str(exc), 503) from exc
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc
            remote_kv = True
        try:
            req = self.engine.make_request(tokens, max_tokens, client_id)
            req.remote_kv = remote_kv
            req.kv_wait_s = waited
            req = await self.engine.submit(req)
        except (RequestTooLarge, ValueError) as exc:
            raise BadRequest(str(exc)) from exc
        if half is not None and half.prefill:
            await self.pd.prefilled(half, req)
        return req

    # ---- OpenAI completions ----------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``."""
        body = await read_body(request)
        self._check_model(body)
        if "prompt" not in body:
            raise BadRequest("prompt is required")
        tokens = prompt_tokens(body["prompt"])
        max_tokens = int_field(body, ("max_tokens", "max_completion_tokens"),
                                self.engine.settings.max_tokens_default)
        stream = bool(body.get("stream", False))
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise BadRequest("stream_options must be an object")
        include_usage = bool(opts.get("include_usage", False))
        try:
            kvt = kv_transfer.parse(body)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        req = await self.run(tokens, max_tokens, client_id(request, body), kvt.remote_prefill,
                             self.half(request, body))
        cid = f"cmpl-{req.request_id}"
        created = int(time.time())
        out_ids = TOKENIZER.output_ids(req.request_id, req.max_tokens)
        usage = self.usage(req)
        if not stream:
            await self.until_finished(req)
            out: dict[str, Any] = {
                "id": cid, "object": "text_completion", "created": created,
                "model": self.engine.settings.model,
                "choices": [{"index": 0, "text": TOKENIZER.decode(out_ids), "logprobs": None,
                             "finish_reason": "length", "stop_reason": None,
                             "prompt_logprobs": None}],
                "usage": usage}
            if kvt.remote_decode:  # vLLM P/D: where the decode engine pulls the KV from
                out["kv_transfer_params"] = self.handover(request, req)
            return web.json_response(out)
        try:  # from the response's start: the abort does not depend on where aiohttp cancels
            resp = await self.sse_start(request)
            for i, tok in await self.paced(req, out_ids):
                await self.wait_token(req, i)
                last = i == len(out_ids) - 1
                await self.sse(resp, {
                    "id": cid, "object": "text_completion", "created": created,
                    "model": self.engine.settings.model,
                    "choices": [{"index": 0, "text": TOKENIZER.decode([tok]), "logprobs": None,
                                 "finish_reason": "length" if last else None,
                                 "stop_reason": None}]})
            if include_usage:
                await self.sse(resp, {"id": cid, "object": "text_completion",
                                       "created": created, "model": self.engine.settings.model,
                                       "choices": [], "usage": usage})
            await resp.write(b"data: [DONE]\n\n")
        except BaseException:  # client gone (or cancelled): free the request's blocks
            self.engine.abort(req)
            raise
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        from engine_sim.chat_api import ChatError, chat_completions

        body = await read_body(request)
        self._check_model(body)
        if "messages" not in body:
            raise BadRequest("messages is required")
        max_tokens = int_field(body, ("max_completion_tokens", "max_tokens"),
                                self.engine.settings.max_tokens_default)
        try:
            return await chat_completions(self, request, body, max_tokens,
                                          client_id(request, body))
        except ChatError as exc:
            raise BadRequest(str(exc)) from exc

    def handover(self, request: web.Request, req: SimRequest) -> dict[str, Any]:
        """vLLM P/D: the prefill answer's ``kv_transfer_params`` for the decode request."""
        host, port = request.url.host or "127.0.0.1", request.url.port or 80
        return kv_transfer.handover(req, f"engine-sim-{host}:{port}", host, port,
                                    self.engine.settings.block_size)

    def usage(self, req: SimRequest) -> dict[str, Any]:
        return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.max_tokens,
                "total_tokens": req.prompt_tokens + req.max_tokens,
                "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}

    async def until_finished(self, req: SimRequest) -> None:
        """Non-streaming: wait for ``req``'s end; a client gone meanwhile aborts it."""
        try:
            await self.engine.sleep_until(req.finished_at or 0.0)
        except BaseException:
            self.engine.abort(req)
            raise

    async def paced(self, req: SimRequest, out_ids: list[int]) -> list[tuple[int, int]]:
        """Wait for the first token; the caller waits for each further one with wait_token."""
        await self.engine.sleep_until(req.first_token_at or 0.0)
        return list(enumerate(out_ids))

    async def sse_start(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def sse(self, resp: web.StreamResponse, obj: dict[str, Any]) -> None:
        await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    async def render(self, request: web.Request) -> web.Response:
        """``POST /v1/completions/render``: the prompt as token ids, vLLM's GenerateRequest list."""
        body = await read_body(request)
        self._check_model(body)
        if "prompt" not in body:
            raise BadRequest("prompt is required")
        prompts = body["prompt"]
        items = prompts if isinstance(prompts, list) and prompts and all(
            isinstance(p, (str, list)) for p in prompts) else [prompts]
        max_tokens = int_field(body, ("max_tokens",), self.engine.settings.max_tokens_default)
        return web.json_response([
            {"request_id": f"render-{i}", "token_ids": prompt_tokens(p),
             "sampling_params": {"max_tokens": max_tokens}, "model": self.engine.settings.model,
             "stream": bool(body.get("stream", False))}
            for i, p in enumerate(items)])

    async def tokenize(self, request: web.Request) -> web.Response:
        """``POST /tokenize`` (vLLM): ``{prompt}`` or ``{messages, add_generation_prompt,
        continue_final_message}`` -> ``{tokens, count, max_model_len}``."""
        from engine_sim.chat_api import ChatError, chat_prompt_ids

        body = await read_body(request)
        self._check_model(body)
        if "messages" in body:
            try:
                tokens = chat_prompt_ids(body)
            except ChatError as exc:
                raise BadRequest(str(exc)) from exc
        else:
            tokens = prompt_tokens(body.get("prompt", ""))
        return web.json_response({"tokens": tokens, "count": len(tokens),
                                  "max_model_len": self.engine.settings.max_prompt_tokens})

    async def wait_token(self, req: SimRequest, i: int) -> None:
        first = req.first_token_at or 0.0
        await self.engine.sleep_until(first + i * self.engine.model.params.decode_s_per_token)

    # ---- info, health, load, metrics -------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``."""
        s = self.engine.settings
        return web.json_response({"object": "list", "data": [{
            "id": s.model, "object": "model", "created": int(self.engine.started_unix),
            "owned_by": "kvroute-engine-sim", "root": s.model, "parent": None,
            "max_model_len": s.max_prompt_tokens}]})

    async def health(self, request: web.Request) -> web.Response:
        """``GET /health``: 200 while serving."""
        return web.Response(status=200)

    async def get_load(self, request: web.Request) -> web.Response:
        """``GET /get_load``: running, waiting and KV usage now."""
        return web.json_response(self.engine.load())

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics`` (Prometheus text)."""
        data = generate_latest(request.app[REGISTRY_KEY])
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """``POST /reset_prefix_cache`` (vLLM): 200, or 400 while requests hold blocks."""
        if self.engine.reset_prefix_cache():
            return web.Response(status=200)
        raise BadRequest("cannot reset the prefix cache while requests are running")

    async def stats(self, request: web.Request) -> web.Response:
        """``GET /kvroute/stats[?since=N&records=0]``."""
        try:
            since = int(request.query.get("since", "0"))
        except ValueError as exc:
            raise BadRequest("since must be an integer") from exc
        with_records = request.query.get("records", "1") not in ("0", "false", "no")
        out = self.engine.stats(since, with_records)
        out["bootstrap_rooms_done"] = self.pd.rooms.done_total
        out["bootstrap_rooms_failed"] = self.pd.rooms.failed_total
        return web.json_response(out)

    async def stats_reset(self, request: web.Request) -> web.Response:
        """``POST /kvroute/stats/reset``: forget per-request records."""
        self.engine.clear_records()
        return web.json_response({"ok": True})


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except BadRequest as exc:
        return error_response(str(exc), exc.status)
    except web.HTTPException:
        raise
    except Exception as exc:  # never let a handler bug take the server down
        log.exception("internal error serving %s", request.path)
        return error_response(f"internal error: {type(exc).__name__}", 500)


def make_app(engine: SimEngine, registry: CollectorRegistry) -> web.Application:
    """The aiohttp application serving ``engine``."""
    from engine_sim.sglang_api import SglangApi

    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[ENGINE_KEY] = engine
    app[REGISTRY_KEY] = registry
    api = Api(engine)

    def guarded(handler: Any) -> Any:
        async def serve(request: web.Request) -> web.StreamResponse:
            try:
                resp: web.StreamResponse = await handler(request)
                return resp
            except BaseException as exc:  # an SGLang prefill half fails its room
                api.pd.failed(request, exc)
                raise
        return serve

    async def close(_app: web.Application) -> None:
        await api.pd.close()

    app.on_cleanup.append(close)
    sglang = SglangApi(api)
    app.add_routes([
        web.post("/v1/completions", guarded(api.completions)),
        web.post("/v1/chat/completions", guarded(api.chat)),
        web.post("/v1/completions/render", api.render),
        web.post("/tokenize", api.tokenize),
        web.post("/generate", guarded(sglang.generate)),
        web.get("/kvroute/bootstrap/rooms/{room}", api.pd.rooms_handler),
        web.get("/v1/models", api.models),
        web.get("/health", api.health),
        web.get("/get_load", api.get_load),
        web.get("/metrics", api.metrics),
        web.get("/server_info", sglang.server_info),
        web.get("/get_server_info", sglang.server_info),
        web.get("/model_info", sglang.model_info),
        web.get("/get_model_info", sglang.model_info),
        web.post("/reset_prefix_cache", api.reset_prefix_cache),
        web.get("/kvroute/stats", api.stats),
        web.post("/kvroute/stats/reset", api.stats_reset),
    ])
    return app
