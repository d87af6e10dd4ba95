"""OpenAI request bodies -> the routing core's :class:`RouteRequest` (shared by every HTTP front).

The gateway (``router_service.gateway``) and the Envoy endpoint picker (``router_service.epp``)
both receive OpenAI-compatible bodies (``/v1/completions``, ``/v1/chat/completions``). This
module parses such a body once, validates only what routing needs (naming the offending field,
in the OpenAI error shape), and leaves every other field alone so the body can be forwarded
byte for byte. It does no I/O: turning text or chat messages into token ids is
:mod:`router_service.prompt_tokens`'s job; :func:`route_request` then builds the core's request.

What routing reads from a body:

- ``model`` (optional: empty = the fleet's only model); a LoRA adapter name is resolved by the
  caller (the fleet's model catalog) into base model + ``lora_name``.
- completions: ``prompt`` as text, token ids, or a list of either (a batch is routed by its first
  prompt, since one engine serves the whole request); chat: ``messages`` (role + content).
- ``stream``, ``stream_options.include_usage``, ``max_tokens`` / ``max_completion_tokens``.
- vLLM's ``cache_salt`` (salts block 0 exactly as the engine salts its cache).
- For tokenization: ``add_special_tokens``, ``add_generation_prompt``, ``continue_final_message``,
  ``chat_template``, ``chat_template_kwargs``, ``tools``, ``documents`` (vLLM's defaults).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt
from xxhash import xxh3_128_digest

from router_service.domain import RouteRequest

Endpoint = Literal["completions", "chat"]
"""``completions`` = ``POST /v1/completions``; ``chat`` = ``POST /v1/chat/completions``."""

ENDPOINT_PATHS: Mapping[Endpoint, str] = {"completions": "/v1/completions",
                                          "chat": "/v1/chat/completions"}

MAX_TOKEN_ID = 2**32 - 1
TokenArray = npt.NDArray[np.int64]
"""Prompt ids as one int64 array: converted once here, used as is by the core's hashing."""
_CHAT_TEMPLATE_FIELDS = ("chat_template", "chat_template_kwargs", "tools", "documents")
_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


class OpenAIError(Exception):
    """An error answered in the OpenAI shape ``{"error": {message, type, param, code}}``."""

    TYPES: Mapping[int, str] = {400: "invalid_request_error", 404: "not_found_error",
                                413: "invalid_request_error", 429: "rate_limit_error",
                                502: "upstream_error", 503: "service_unavailable",
                                504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code or self.status}}

    def encoded(self) -> bytes:
        """:meth:`body` as JSON bytes."""
        return _ENCODER.encode(self.body())


def engine_base_url(address: str, scheme: str = "http") -> str:
    """``http://host:port`` of an engine: node addresses may or may not carry the scheme."""
    return address.rstrip("/") if "://" in address else f"{scheme}://{address}"


def bad_field(param: str, message: str) -> OpenAIError:
    """400 naming ``param``."""
    return OpenAIError(400, f"{param}: {message}", param=param)


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """What routing needs from one parsed body; ``body`` is the whole parsed object."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    max_output_tokens: int
    cache_salt: str | None
    prompt: str | TokenArray | None = None
    """completions: the (first) prompt as text or token ids; None for chat."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """chat: the conversation."""
    add_special_tokens: bool = True
    """vLLM default: True for completions, False for chat."""

    @property
    def token_ids(self) -> TokenArray | None:
        """The prompt's token ids when the client sent ids (no tokenization needed)."""
        return self.prompt if isinstance(self.prompt, np.ndarray) else None

    def tokenize_body(self) -> dict[str, Any]:
        """The body of vLLM's ``POST /tokenize`` that yields exactly this request's prompt ids.

        ``model`` is the name the client used (an adapter may bring its own tokenizer).
        """
        out: dict[str, Any] = {"model": self.model} if self.model else {}
        if self.endpoint == "completions":
            out["prompt"] = self.body["prompt"] if isinstance(self.prompt, np.ndarray) \
                else self.prompt
            out["add_special_tokens"] = self.add_special_tokens
            return out
        b = self.body
        out["messages"] = self.messages
        out["add_generation_prompt"] = b.get("add_generation_prompt", True)
        out["continue_final_message"] = b.get("continue_final_message", False)
        out["add_special_tokens"] = self.add_special_tokens
        for name in _CHAT_TEMPLATE_FIELDS:
            if b.get(name) is not None:
                out[name] = b[name]
        return out

    def tokenize_key(self) -> bytes:
        """A 16-byte key of everything that decides the prompt's token ids (cache key)."""
        return xxh3_128_digest(_ENCODER.encode([self.endpoint, self.tokenize_body()]))


def decode_json(raw: bytes) -> dict[str, Any]:
    """Parse a request body; 400 when it is not one JSON object."""
    if not raw:
        raise OpenAIError(400, "request body is empty; expected a JSON object")
    try:
        body = _DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token_ids(value: list[Any], param: str) -> TokenArray:
    """One int64 array (NumPy converts ~30 ns per id; a Python loop would cost ~10x)."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is not None and arr.ndim == 1 and arr.dtype.kind in "iu" and (
            not len(arr) or (int(arr.min()) >= 0 and int(arr.max()) <= MAX_TOKEN_ID)):
        return arr.astype(np.int64, copy=False)
    for i, t in enumerate(value):  # slow path: name the first bad element
        if not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID:
            raise bad_field(param, f"element {i} is {t!r}; token ids are integers in "
                                   f"0..{MAX_TOKEN_ID}")
    raise bad_field(param, f"must be a list of integers in 0..{MAX_TOKEN_ID}")


def _prompt(value: Any) -> str | TokenArray:
    """The prompt to route by: text, ids, or the first of a batch of either."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            raise bad_field("prompt", "must not be empty")
        first = value[0]
        if isinstance(first, str):
            if not all(isinstance(p, str) for p in value):
                raise bad_field("prompt", "a batch must be all strings or all token-id lists")
            return first
        if isinstance(first, list):
            if not all(isinstance(p, list) for p in value):
                raise bad_field("prompt", "a batch must be all strings or all token-id lists")
            for i, p in enumerate(value):
                if not p:
                    raise bad_field(f"prompt[{i}]", "must not be empty")
            for i, p in enumerate(value[1:], 1):
                _token_ids(p, f"prompt[{i}]")
            return _token_ids(first, "prompt[0]")
        return _token_ids(value, "prompt")
    raise bad_field("prompt", "must be a string, a list of token ids, or a list of either")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad_field("messages", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise bad_field(f"messages[{i}]", "must be an object with role and content")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise bad_field(f"messages[{i}].role", "is required (a string)")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_field(f"messages[{i}].content",
                            "must be a string, a list of content parts, or null")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise bad_field(f"messages[{i}].content[{j}]",
                                    "must be an object with a type")
    return value


def _optional_int(body: Mapping[str, Any], names: Sequence[str]) -> int:
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v) or v < 0:
            raise bad_field(name, f"must be a non-negative integer (got {v!r})")
        return int(v)
    return 0


def _optional_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_field(name, f"must be true or false (got {v!r})")
    return v


def parse(endpoint: Endpoint, body: dict[str, Any]) -> OpenAIRequest:
    """Validate what routing reads from a parsed body (400 naming the field)."""
    model = body.get("model", "")
    if model is None:
        model = ""
    if not isinstance(model, str):
        raise bad_field("model", f"must be a string (got {type(model).__name__})")
    stream = _optional_bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_field("stream_options", "must be an object")
    include_usage = bool(opts and opts.get("include_usage"))
    max_out = _optional_int(body, ("max_completion_tokens", "max_tokens"))
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise bad_field("cache_salt", "must be a non-empty string")
    if endpoint == "completions":
        if "prompt" not in body:
            raise bad_field("prompt", "is required")
        return OpenAIRequest(endpoint, body, model, stream, include_usage, max_out, salt,
                             prompt=_prompt(body["prompt"]),
                             add_special_tokens=_optional_bool(body, "add_special_tokens", True))
    if "messages" not in body:
        raise bad_field("messages", "is required")
    messages = _messages(body["messages"])
    for name in ("add_generation_prompt", "continue_final_message"):
        _optional_bool(body, name, False)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad_field("chat_template_kwargs", "must be an object")
    return OpenAIRequest(endpoint, body, model, stream, include_usage, max_out, salt,
                         messages=messages,
                         add_special_tokens=_optional_bool(body, "add_special_tokens", False))


def parse_bytes(endpoint: Endpoint, raw: bytes) -> OpenAIRequest:
    """:func:`decode_json` then :func:`parse`: the one parse of a request body."""
    return parse(endpoint, decode_json(raw))


def route_request(req: OpenAIRequest, token_ids: Sequence[int] | TokenArray, *, request_id: str,
                  model: str, lora_name: str | None = None, session_id: str | None = None,
                  policy: str | None = None, allowed: frozenset[str] | None = None,
                  excluded: frozenset[str] = frozenset(),
                  deadline_s: float | None = None) -> RouteRequest:
    """The core's request for ``req`` once its prompt is token ids.

    ``model`` is the base model (the catalog resolved an adapter name into ``lora_name``);
    ``allowed`` narrows the candidates (e.g. the nodes that have the adapter loaded).
    """
    return RouteRequest(request_id=request_id, model=model, token_ids=token_ids,
                        session_id=session_id, policy=policy, lora_name=lora_name,
                        cache_salt=req.cache_salt, max_output_tokens=req.max_output_tokens,
                        allowed=allowed, excluded=excluded, deadline_s=deadline_s)
