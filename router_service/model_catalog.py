"""The fleet's models and LoRA adapters, for HTTP fronts: ``model`` in a body -> what to route.

Base models come from the nodes the routing core knows (each node registers one model). LoRA
adapters are learnt from the engines themselves: every ``refresh_s`` the catalog asks each
healthy node's ``GET /v1/models`` (vLLM lists loaded adapters there with ``parent`` = the base
model), so an adapter loaded at run time (``/v1/load_lora_adapter``) becomes routable without
configuration. A name that is not known triggers one early refresh (at most once per
``min_refresh_s``) before the request is answered 404.

:meth:`ModelCatalog.resolve` gives the base model, the adapter name (which salts block 0 exactly
as the engine salts its KV events) and the nodes that have the adapter loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from kvroute.aio import cancel_and_wait
from router_service.openai_request import OpenAIError, engine_base_url
from router_service.placement import NodeState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """What routing needs for a request's ``model``."""

    model: str
    """Base model ("" = let the core default it)."""
    lora_name: str | None = None
    allowed: frozenset[str] | None = None
    """Node ids that have the adapter loaded (None = every node of the model)."""


@dataclass(frozen=True, slots=True)
class Adapter:
    """One LoRA adapter seen on the fleet."""

    name: str
    base: str
    nodes: frozenset[str]


class ModelCatalog:
    """Models from the core's nodes, adapters from the engines' ``/v1/models``."""

    def __init__(self, nodes: Callable[[], Sequence[NodeState]],
                 session: aiohttp.ClientSession | None, refresh_s: float = 10.0,
                 min_refresh_s: float = 1.0, timeout_s: float = 2.0, scheme: str = "http",
                 ) -> None:
        self._nodes = nodes
        self.session = session
        self.refresh_s = refresh_s
        self.min_refresh_s = min_refresh_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.scheme = scheme
        self.adapters: dict[str, Adapter] = {}
        self._last_refresh = -1e9
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None

    # -- lookup -----------------------------------------------------------------------------
    def base_models(self, healthy_only: bool = True) -> list[str]:
        """Models served by known (healthy) nodes, sorted."""
        return sorted({n.model for n in self._nodes() if n.healthy or not healthy_only})

    def _resolve_now(self, model: str) -> ResolvedModel | None:
        if not model:
            return ResolvedModel("")
        known = {n.model for n in self._nodes()}
        if model in known:
            return ResolvedModel(model)
        ad = self.adapters.get(model)
        if ad is not None:
            return ResolvedModel(ad.base, ad.name, ad.nodes)
        return None

    async def resolve(self, model: str) -> ResolvedModel:
        """Base model, adapter and allowed nodes of ``model``; OpenAIError 404 when no node
        serves it, 503 when no node is known at all."""
        found = self._resolve_now(model)
        if found is not None:
            return found
        if time.monotonic() - self._last_refresh >= self.min_refresh_s:
            await self.refresh()
            found = self._resolve_now(model)
            if found is not None:
                return found
        served = sorted({n.model for n in self._nodes()} | set(self.adapters))
        if not served:
            raise OpenAIError(503, "no engine is registered yet; retry later")
        raise OpenAIError(404, f"The model `{model}` does not exist (served: "
                          f"{', '.join(served)})", param="model", code="model_not_found")

    def listing(self) -> list[dict[str, Any]]:
        """``GET /v1/models`` entries: base models, then adapters (``parent`` = base)."""
        out: list[dict[str, Any]] = [
            {"id": m, "object": "model", "created": 0, "owned_by": "kvroute", "root": m,
             "parent": None} for m in self.base_models()]
        out += [{"id": a.name, "object": "model", "created": 0, "owned_by": "kvroute",
                 "root": a.name, "parent": a.base} for a in sorted(
                     self.adapters.values(), key=lambda a: a.name)]
        return out

    # -- refresh ----------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Ask every healthy node's ``/v1/models`` now (concurrent callers share one pass)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        self._last_refresh = time.monotonic()
        nodes = [n for n in self._nodes() if n.healthy]
        if self.session is None or not nodes:
            return
        answers = await asyncio.gather(*(self._models_of(n) for n in nodes))
        seen: dict[str, tuple[str, set[str]]] = {}
        for node, entries in zip(nodes, answers, strict=True):
            if entries is None:  # unreachable: keep what we knew of it
                for ad in self.adapters.values():
                    if node.node_id in ad.nodes:
                        seen.setdefault(ad.name, (ad.base, set()))[1].add(node.node_id)
                continue
            for e in entries:
                parent = e.get("parent")
                name = e.get("id")
                if isinstance(name, str) and isinstance(parent, str) and parent and \
                        name != node.model:
                    seen.setdefault(name, (node.model, set()))[1].add(node.node_id)
        self.adapters = {name: Adapter(name, base, frozenset(ids))
                         for name, (base, ids) in seen.items()}

    async def _models_of(self, node: NodeState) -> list[dict[str, Any]] | None:
        assert self.session is not None
        try:
            async with self.session.get(f"{engine_base_url(node.address, self.scheme)}/v1/models",
                                        timeout=self.timeout) as resp:
                if resp.status != 200:
                    return None
                data = msgspec.json.decode(await resp.read()).get("data", [])
                return [e for e in data if isinstance(e, dict)]
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, AttributeError) as exc:
            log.debug("GET /v1/models on %s failed: %s", node.address, exc)
            return None

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.refresh()
            await asyncio.sleep(self.refresh_s)

    def start(self) -> None:
        """Refresh every ``refresh_s`` in the background."""
        if self._task is None and self.session is not None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop refreshing."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
