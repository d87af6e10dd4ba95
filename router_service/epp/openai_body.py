"""OpenAI request body -> the routing core's RouteRequest, for the picker.

Token-id prompts to ``/v1/completions`` go to the core as ids on a fast path (ids checked in C).
Text prompts and chat messages go through the gateway's own parser and tokenization
(:mod:`router_service.openai_request`, :mod:`router_service.prompt_tokens`: the engine's
``POST /tokenize``, cached per body), so the picker and the gateway hash exactly the same ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from router_service import openai_request
from router_service.domain import RouteRequest
from router_service.prompt_tokens import PromptTokens

COMPLETIONS = "/v1/completions"
TokenIds = list[Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]]
"""Token ids as JSON gives them: integers in 0..2**32-1 (the core applies --max-token-id)."""
CHAT = "/v1/chat/completions"


class BodyError(Exception):
    """A request the picker answers itself with ``status`` (OpenAI error shape)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What the request headers add to the body: ids, hints, and the subset."""

    request_id: str
    session_id: str | None
    policy: str | None
    allowed: frozenset[str] | None


def endpoint_of(path: str) -> str | None:
    """``/v1/completions`` or ``/v1/chat/completions`` (query string ignored), else None."""
    p = path.split("?", 1)[0].rstrip("/")
    return p if p in (COMPLETIONS, CHAT) else None


def _decode(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BodyError(400, "request body is empty; expected a JSON object")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BodyError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BodyError(400, "request body must be a JSON object")
    return body


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        value = value[0]  # a batch is routed by its first prompt (one engine serves it all)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        # checked in C (16k ids: ~0.1 ms against ~5 ms for a Python loop); booleans, floats,
        # strings and out-of-range ids are refused by position
        try:
            return msgspec.convert(value, TokenIds)
        except msgspec.ValidationError as exc:
            raise BodyError(400, f"prompt: token ids must be integers ({exc})") from None
    raise BodyError(400, "prompt: must be a string, a list of token ids, or a list of either")


async def build(endpoint: str, raw: bytes, ctx: RouteContext, tokens: PromptTokens | None,
                engines: Callable[[str], Sequence[str]]) -> RouteRequest:
    """The core's request for one OpenAI body (BodyError for a body routing cannot use).

    ``tokens`` tokenizes text prompts and chat messages as the gateway does (None = token ids
    only); ``engines(model)`` lists addresses of healthy engines of a model to ask.
    """
    body = _decode(raw)
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise BodyError(400, "model: must be a string")
    prompt = _prompt(body["prompt"]) if endpoint == COMPLETIONS and "prompt" in body else None
    if isinstance(prompt, list):  # token ids: no tokenization, ids checked in C
        max_out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        max_out = max_out if isinstance(max_out, int) and max_out > 0 else 0
        salt = body.get("cache_salt")
        salt = salt if isinstance(salt, str) and salt else None
        return RouteRequest(request_id=ctx.request_id, model=model, token_ids=prompt,
                            session_id=ctx.session_id, policy=ctx.policy, cache_salt=salt,
                            max_output_tokens=max_out, allowed=ctx.allowed)
    if tokens is None:
        raise BodyError(400, "text prompts and chat messages need engine tokenization "
                             "(--engine-tokenize); send token-id prompts to /v1/completions")
    try:
        oreq = openai_request.parse("completions" if endpoint == COMPLETIONS else "chat", body)
        ids = await tokens.token_ids(oreq, model, lambda: engines(model))
    except openai_request.OpenAIError as exc:
        raise BodyError(exc.status, exc.message) from None
    return openai_request.route_request(oreq, ids, request_id=ctx.request_id, model=model,
                                        session_id=ctx.session_id, policy=ctx.policy,
                                        allowed=ctx.allowed)
