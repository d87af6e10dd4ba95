"""Token ids of an OpenAI request's prompt, exactly as the engine will compute them.

One differing token id shifts every block hash after it, so routing must tokenize exactly as
the engine does, chat template included. In order:

1. token-id prompts are used as they are;
2. a model with local tokenizer files configured (``--tokenizer-dirs MODEL=DIR``) is tokenized
   in-process by :class:`router_service.chat_template.ModelTokenizer` (``tokenizer.json`` + the
   chat template, applied the way vLLM applies it);
3. otherwise an engine of that model is asked: vLLM's ``POST /tokenize`` (engine_sim serves the
   same request and response shape), with the same template fields the request carries. The
   answer is cached per request body (an LRU keyed by :meth:`OpenAIRequest.tokenize_key`), so a
   retried or repeated request costs no second round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import msgspec

from router_service.openai_request import (
    OpenAIError,
    OpenAIRequest,
    TokenArray,
    engine_base_url,
)

log = logging.getLogger(__name__)


class LocalTokenizer(Protocol):
    """A model's own tokenizer, in-process."""

    def token_ids(self, req: OpenAIRequest) -> list[int]:
        """Prompt ids of ``req`` (raises OpenAIError 400 for a template error)."""
        ...


class EngineTokenizer:
    """Asks an engine's ``POST /tokenize`` (vLLM's request and response shape)."""

    def __init__(self, session: aiohttp.ClientSession, timeout_s: float = 5.0,
                 scheme: str = "http") -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.scheme = scheme

    async def tokenize(self, address: str, body: Mapping[str, Any]) -> list[int]:
        """Ids for ``body``; OpenAIError with the engine's status for a 4xx answer; connection
        problems and 5xx raise ``aiohttp.ClientError`` (the caller tries another engine)."""
        url = f"{engine_base_url(address, self.scheme)}/tokenize"
        async with self.session.post(url, data=msgspec.json.encode(body),
                                     headers={"Content-Type": "application/json"},
                                     timeout=self.timeout) as resp:
            raw = await resp.read()
            if 400 <= resp.status < 500:
                raise OpenAIError(resp.status, f"the engine could not tokenize the prompt: "
                                  f"{_engine_message(raw)}")
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                  message=_engine_message(raw))
        try:
            tokens = msgspec.json.decode(raw)["tokens"]
        except (msgspec.DecodeError, KeyError, TypeError) as exc:
            raise aiohttp.ClientPayloadError(f"/tokenize answer without tokens: {exc}") from None
        if not isinstance(tokens, list):
            raise aiohttp.ClientPayloadError("/tokenize answer: tokens is not a list")
        return tokens


def _engine_message(raw: bytes) -> str:
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw[:300].decode("utf-8", "replace")
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in obj:
            return str(obj["message"])
    return raw[:300].decode("utf-8", "replace")


class TokenCache:
    """LRU of prompt ids keyed by :meth:`OpenAIRequest.tokenize_key`."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._d: OrderedDict[bytes, list[int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> list[int] | None:
        """Cached ids (and mark them recently used)."""
        ids = self._d.get(key)
        if ids is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return ids

    def put(self, key: bytes, ids: list[int]) -> None:
        """Remember ``ids``, dropping the least recently used beyond the limit."""
        if self.max_entries <= 0:
            return
        self._d[key] = ids
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class PromptTokens:
    """Token ids for routing: passthrough, local tokenizer files, or an engine's /tokenize."""

    def __init__(self, local: Mapping[str, LocalTokenizer], engine: EngineTokenizer | None,
                 cache: TokenCache) -> None:
        self.local = dict(local)
        self.engine = engine
        self.cache = cache
        self.by_source: dict[str, int] = {"ids": 0, "local": 0, "cache": 0, "engine": 0}
        self._pending: dict[bytes, asyncio.Future[list[int]]] = {}

    async def token_ids(self, req: OpenAIRequest, base_model: str,
                        engines: Callable[[], Sequence[str]]) -> list[int] | TokenArray:
        """Ids of ``req``'s prompt. ``engines()``: addresses of engines serving the request's
        model (asked in turn when the prompt must be tokenized remotely)."""
        given = req.token_ids
        if given is not None:
            self.by_source["ids"] += 1
            return given
        local = self.local.get(req.model) or self.local.get(base_model)
        if local is not None:
            self.by_source["local"] += 1
            return local.token_ids(req)
        key = req.tokenize_key()
        cached = self.cache.get(key)
        if cached is not None:
            self.by_source["cache"] += 1
            return cached
        pending = self._pending.get(key)
        if pending is not None:  # the same body is being tokenized right now: share the answer
            self.by_source["cache"] += 1
            return await asyncio.shield(pending)
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            ids = await self._ask_engines(req, engines())
            fut.set_result(ids)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._pending[key]
        self.cache.put(key, ids)
        self.by_source["engine"] += 1
        return ids

    async def _ask_engines(self, req: OpenAIRequest, engines: Sequence[str]) -> list[int]:
        if self.engine is None:
            raise OpenAIError(400, f"model {req.model!r}: text prompts need tokenizer files "
                              "(--tokenizer-dirs) or engine tokenization; send token ids")
        if not engines:
            raise OpenAIError(503, f"no healthy engine of model {req.model!r} to tokenize the "
                              "prompt; retry later")
        body = req.tokenize_body()
        last = ""
        for address in engines[:3]:
            try:
                return await self.engine.tokenize(address, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{address}: {type(exc).__name__}: {exc}"
                log.warning("tokenize on %s failed: %s", address, exc)
        raise OpenAIError(503, f"no engine could tokenize the prompt ({last}); retry later")
