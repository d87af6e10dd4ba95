"""Reading engine_sim's HTTP requests: the JSON body, prompts, token ids and integer fields,
the client's request id, and the OpenAI-style error a bad one gets (:class:`BadRequest`).

Shared by every route module (:mod:`engine_sim.http_api`, :mod:`engine_sim.sglang_api`); a
bad request never reaches the engine.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from engine_sim.tokenizer import SimpleTokenizer

TOKENIZER = SimpleTokenizer()
MAX_TOKENS_LIMIT = 1 << 20
_JSON = msgspec.json.Decoder()
_TokenIds = list[Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]]


class BadRequest(Exception):
    """A client error answered with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_response(message: str, status: int) -> web.Response:
    """The OpenAI-style error body vLLM answers with."""
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return web.json_response({"object": "error", "message": message, "type": kind,
                              "param": None, "code": status}, status=status)


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (BadRequest when it is not one)."""
    try:
        body = _JSON.decode(await request.read())  # C speed: prompts run to 100k token ids
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def token_list(value: list[Any], what: str) -> list[int]:
    """``value`` as token ids (BadRequest unless every item is an int in uint32 range)."""
    # one pass in C (msgspec: bools and floats are not ints); the three C passes it replaces
    # (set of types, min, max) took 20 % of the engine process on the full trace (py-spy, s28)
    try:
        return msgspec.convert(value, _TokenIds)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"{what} must be token ids (integers in 0..4294967295): "
                         f"{exc}") from None


def prompt_tokens(value: Any, what: str = "prompt") -> list[int]:
    """Token ids of a prompt given as text, ids, or a one-element list of either."""
    if isinstance(value, str):
        return TOKENIZER.encode(value)
    if isinstance(value, list):
        if value and all(isinstance(v, (str, list)) for v in value):
            if len(value) != 1:
                raise BadRequest(f"{what}: only one prompt per request is supported")
            return prompt_tokens(value[0], what)
        return token_list(value, what)
    raise BadRequest(f"{what} must be a string or a list of token ids")


def int_field(body: dict[str, Any], names: tuple[str, ...], default: int) -> int:
    """The first of ``names`` present in ``body`` (an int in 1..MAX_TOKENS_LIMIT), else
    ``default``."""
    for name in names:
        val = body.get(name)
        if val is None:
            continue
        if not isinstance(val, int) or isinstance(val, bool) or not 1 <= val <= MAX_TOKENS_LIMIT:
            raise BadRequest(f"{name} must be an integer in 1..{MAX_TOKENS_LIMIT}")
        return val
    return default


def client_id(request: web.Request, body: dict[str, Any]) -> str:
    """The request id of the engine's record: the body's ``user`` or ``rid``, else the
    ``X-Request-Id`` header (at most 256 characters)."""
    for key in ("user", "rid"):
        val = body.get(key)
        if isinstance(val, str) and val:
            return val[:256]
    return request.headers.get("X-Request-Id", "")[:256]
