"""Typed clients of ``kvroute.v1.Router``: :class:`RouterClient` (blocking) and
:class:`AsyncRouterClient` (asyncio). For gateway authors who keep their own proxy: Route,
send the request to ``route.address``, then Complete with the engine's cached tokens."""

from __future__ import annotations

from types import TracebackType

from kvroute.client.base import AsyncCaller, SyncCaller
from kvroute.client.options import ClientOptions
from kvroute.client.types import Route, route_request
from kvroute.v1 import router_pb2, router_pb2_grpc


def _complete_request(request_id: str, success: bool, cached_tokens: int | None,
                      prefill_only: bool = False) -> router_pb2.CompleteRequest:
    req = router_pb2.CompleteRequest(request_id=request_id, success=success,
                                     prefill_only=prefill_only)
    if cached_tokens is not None:
        req.cached_tokens = cached_tokens
    return req


class RouterClient:
    """Blocking Router client; errors raise :mod:`kvroute.errors` types (``.code`` = status)."""

    def __init__(self, options: ClientOptions) -> None:
        self._c = SyncCaller(options, router_pb2_grpc.RouterStub)

    def route(self, request_id: str, *, token_ids: list[int] | None = None,
              prompt: str | None = None, model: str = "", session_id: str | None = None,
              policy: str | None = None, lora_name: str | None = None,
              cache_salt: str | None = None, max_output_tokens: int = 0,
              timeout_s: float | None = None) -> Route:
        """One decision for a prompt given as token ids (preferred) or text."""
        req = route_request(request_id, token_ids=token_ids, prompt=prompt, model=model,
                            session_id=session_id, policy=policy, lora_name=lora_name,
                            cache_salt=cache_salt, max_output_tokens=max_output_tokens)
        return Route.from_pb(self._c.call("Route", req, timeout_s))

    def complete(self, request_id: str, success: bool = True, cached_tokens: int | None = None,
                 timeout_s: float | None = None, prefill_only: bool = False) -> bool:
        """Release the request's in-flight slot; True when it was in flight. ``prefill_only``:
        only the prefill half of a disaggregated pair (its KV is handed over)."""
        resp = self._c.call(
            "Complete", _complete_request(request_id, success, cached_tokens, prefill_only),
            timeout_s)
        return bool(resp.released)

    def stats(self, timeout_s: float | None = None) -> router_pb2.StatsResponse:
        """Counters and in-flight requests per node."""
        resp: router_pb2.StatsResponse = self._c.call("Stats", router_pb2.StatsRequest(),
                                                      timeout_s)
        return resp

    def close(self) -> None:
        """Close the channels."""
        self._c.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncRouterClient:
    """asyncio Router client; same methods as :class:`RouterClient`, awaited."""

    def __init__(self, options: ClientOptions) -> None:
        self._c = AsyncCaller(options, router_pb2_grpc.RouterStub)

    async def route(self, request_id: str, *, token_ids: list[int] | None = None,
                    prompt: str | None = None, model: str = "", session_id: str | None = None,
                    policy: str | None = None, lora_name: str | None = None,
                    cache_salt: str | None = None, max_output_tokens: int = 0,
                    timeout_s: float | None = None) -> Route:
        """One decision for a prompt given as token ids (preferred) or text."""
        req = route_request(request_id, token_ids=token_ids, prompt=prompt, model=model,
                            session_id=session_id, policy=policy, lora_name=lora_name,
                            cache_salt=cache_salt, max_output_tokens=max_output_tokens)
        return Route.from_pb(await self._c.call("Route", req, timeout_s))

    async def complete(self, request_id: str, success: bool = True,
                       cached_tokens: int | None = None,
                       timeout_s: float | None = None, prefill_only: bool = False) -> bool:
        """Release the request's in-flight slot; True when it was in flight. ``prefill_only``:
        only the prefill half of a disaggregated pair (its KV is handed over)."""
        resp = await self._c.call(
            "Complete", _complete_request(request_id, success, cached_tokens, prefill_only),
            timeout_s)
        return bool(resp.released)

    async def stats(self, timeout_s: float | None = None) -> router_pb2.StatsResponse:
        """Counters and in-flight requests per node."""
        resp: router_pb2.StatsResponse = await self._c.call(
            "Stats", router_pb2.StatsRequest(), timeout_s)
        return resp

    async def close(self) -> None:
        """Close the channels."""
        await self._c.close()

    async def __aenter__(self) -> AsyncRouterClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
