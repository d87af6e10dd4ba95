"""SGLang's native side of engine_sim: ``POST /generate``, ``/server_info``, ``/model_info``.

``/generate`` takes ``input_ids`` or ``text`` and ``sampling_params.max_new_tokens`` (what
sglang-router sends for token-id prompts), streaming or not, and SGLang's PD fields
(``bootstrap_host/port/room``, :mod:`engine_sim.bootstrap`). ``/server_info`` reports the
role as ``disaggregation_mode`` and the bootstrap port (the HTTP port), never a ``model_path``
(sglang-router would try to download a tokenizer, PEERS.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from engine_sim.http_request import (
    TOKENIZER,
    BadRequest,
    client_id,
    int_field,
    prompt_tokens,
    read_body,
)

if TYPE_CHECKING:
    from engine_sim.http_api import Api


class SglangApi:
    """SGLang-native route handlers over an :class:`engine_sim.http_api.Api`."""

    def __init__(self, api: Api) -> None:
        self.api = api

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """``POST /generate`` (SGLang): ``input_ids`` or ``text``; ``sampling_params``."""
        body = await read_body(request)
        if body.get("input_ids") is not None:
            ids = body["input_ids"]
            if not isinstance(ids, list):
                raise BadRequest("input_ids must be a list of token ids")
            tokens = prompt_tokens(ids, "input_ids")
        elif body.get("text") is not None:
            tokens = prompt_tokens(body["text"], "text")
        else:
            raise BadRequest("one of input_ids or text is required")
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise BadRequest("sampling_params must be an object")
        default = self.api.engine.settings.max_tokens_default
        max_new = int_field(params, ("max_new_tokens",), default)
        req = await self.api.run(tokens, max_new, client_id(request, body),
                                 half=self.api.half(request, body))
        out_ids = TOKENIZER.output_ids(req.request_id, req.max_tokens)
        meta = {"id": req.client_request_id or req.request_id,
                "prompt_tokens": req.prompt_tokens, "completion_tokens": req.max_tokens,
                "cached_tokens": req.cached_tokens,
                "finish_reason": {"type": "length", "length": req.max_tokens}}
        if not body.get("stream"):
            await self.api.until_finished(req)
            return web.json_response({"text": TOKENIZER.decode(out_ids), "output_ids": out_ids,
                                      "meta_info": meta})
        try:  # from the response's start: the abort does not depend on where aiohttp cancels
            resp = await self.api.sse_start(request)
            for i, _ in await self.api.paced(req, out_ids):
                await self.api.wait_token(req, i)
                await self.api.sse(resp, {"text": TOKENIZER.decode(out_ids[: i + 1]),
                                           "output_ids": out_ids[: i + 1], "meta_info": meta})
            await resp.write(b"data: [DONE]\n\n")
        except BaseException:  # client gone (or cancelled): free the request's blocks
            self.api.engine.abort(req)
            raise
        return resp

    async def server_info(self, request: web.Request) -> web.Response:
        """SGLang-style ``/server_info``; no ``model_path`` on purpose (PEERS.md)."""
        s = self.api.engine.settings
        return web.json_response({"served_model_name": s.model, "page_size": s.block_size,
                                  "max_running_requests": s.max_running,
                                  "engine": "kvroute-engine-sim",
                                  "disaggregation_mode": {"both": "null"}.get(s.role, s.role),
                                  "disaggregation_bootstrap_port": request.url.port})

    async def model_info(self, request: web.Request) -> web.Response:
        """SGLang-style ``/model_info`` without ``model_path``/``tokenizer_path``."""
        return web.json_response({"is_generation": True,
                                  "served_model_name": self.api.engine.settings.model})
