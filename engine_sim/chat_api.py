"""engine_sim's ``POST /v1/chat/completions`` and the chat form of ``POST /tokenize`` (vLLM's).

Messages are rendered with a fixed ChatML-style template (:func:`render_chat`) and tokenized with
engine_sim's :class:`SimpleTokenizer` (the server's one, :mod:`engine_sim.http_request`), so a
gateway that asks ``/tokenize`` with the same ``messages`` gets exactly the ids the chat
endpoint will prefill. Content given as a list of
parts is joined with newlines (vLLM's "string" content format); ``add_generation_prompt``
(default true) appends the assistant header; ``continue_final_message`` leaves the last message
open instead.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engine_sim import kv_transfer
from engine_sim.http_request import TOKENIZER

if TYPE_CHECKING:
    from engine_sim.http_api import Api

class ChatError(ValueError):
    """A malformed chat request (the message names the field)."""


def _content(m: Any, i: int) -> str:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ChatError(f"messages[{i}]: must be an object with a string role")
    content = m.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text":
                raise ChatError(f"messages[{i}].content[{j}]: only text parts are supported")
            parts.append(str(p.get("text", "")))
        return "\n".join(parts)
    raise ChatError(f"messages[{i}].content: must be a string, a list of parts or null")


def render_chat(messages: Any, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> str:
    """The prompt text of a conversation (ChatML-style template)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages: must be a non-empty list")
    if add_generation_prompt and continue_final_message:
        raise ChatError("continue_final_message and add_generation_prompt cannot both be true")
    out = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        text = _content(m, i)
        if continue_final_message and i == last:
            out.append(f"<|im_start|>{m['role']}\n{text}")
        else:
            out.append(f"<|im_start|>{m['role']}\n{text}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def chat_prompt_ids(body: dict[str, Any]) -> list[int]:
    """Token ids of a chat body's ``messages`` (ChatError for bad input)."""
    agp = body.get("add_generation_prompt", True)
    cfm = body.get("continue_final_message", False)
    if not isinstance(agp, bool) or not isinstance(cfm, bool):
        raise ChatError("add_generation_prompt and continue_final_message must be booleans")
    return TOKENIZER.encode(render_chat(body.get("messages"), agp, cfm))


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any],
           finish: str | None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish, "stop_reason": None}]}


async def chat_completions(api: Api, request: web.Request, body: dict[str, Any],
                           max_tokens: int, client_id: str) -> web.StreamResponse:
    """``POST /v1/chat/completions`` for an already validated body."""
    tokens = chat_prompt_ids(body)
    model = api.engine.settings.model
    try:
        kvt = kv_transfer.parse(body)
    except ValueError as exc:
        raise ChatError(str(exc)) from exc
    req = await api.run(tokens, max_tokens, client_id, kvt.remote_prefill,
                        api.half(request, body))
    cid = f"chatcmpl-{req.request_id}"
    created = int(time.time())
    out_ids = TOKENIZER.output_ids(req.request_id, req.max_tokens)
    usage = api.usage(req)
    opts = body.get("stream_options") or {}
    if not body.get("stream"):
        await api.until_finished(req)
        out: dict[str, Any] = {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                  "content": TOKENIZER.decode(out_ids)},
                         "logprobs": None, "finish_reason": "length", "stop_reason": None}],
            "usage": usage}
        if kvt.remote_decode:  # vLLM P/D: where the decode engine pulls the KV from
            out["kv_transfer_params"] = api.handover(request, req)
        return web.json_response(out)
    try:  # from the response's start: the abort does not depend on where aiohttp cancels
        resp = await api.sse_start(request)
        pairs = await api.paced(req, out_ids)
        await api.sse(resp, _chunk(cid, created, model, {"role": "assistant", "content": ""},
                                   None))
        for i, tok in pairs:
            await api.wait_token(req, i)
            last = i == len(out_ids) - 1
            await api.sse(resp, _chunk(cid, created, model,
                                       {"content": TOKENIZER.decode([tok])},
                                       "length" if last else None))
        if isinstance(opts, dict) and opts.get("include_usage"):
            await api.sse(resp, {"id": cid, "object": "chat.completion.chunk",
                                 "created": created, "model": model, "choices": [],
                                 "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
    except BaseException:  # client gone (or cancelled): free the request's blocks
        api.engine.abort(req)
        raise
    return resp
