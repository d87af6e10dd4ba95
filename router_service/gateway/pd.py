"""One disaggregated request through the gateway: the prefill node, then the decode node.

When a model's pool is disaggregated (prefill-only and decode-only nodes), the routing core
answers a (prefill, decode) pair (:mod:`router_service.disagg`, unchanged). The gateway then
speaks the engines' hand-over protocol, chosen by ``--pd-protocol`` (engines do not announce
which one they speak; one fleet runs one engine kind):

- ``vllm`` (vLLM's disaggregated serving with a KV connector, as vLLM's own proxies and
  vllm-router do): the prefill node gets the body with ``kv_transfer_params =
  {"do_remote_decode": true, ...}``, ``max_tokens`` (and ``max_completion_tokens``) 1,
  ``stream`` false and no ``stream_options``; its JSON answer's ``kv_transfer_params`` go into
  the client's body for the decode node, whose answer (streamed or not) is relayed. The
  prefill half is released in the core (``complete_prefill``) as soon as its answer is in.
- ``sglang`` (SGLang's ``--disaggregation-mode``, as sglang-router does): the client's body
  plus ``bootstrap_host`` (the prefill node's host), ``bootstrap_port`` (``--pd-bootstrap-port``;
  0 = the prefill node's HTTP port, engine_sim's bootstrap server) and a random
  ``bootstrap_room`` goes to both nodes at once; the decode answer is relayed, the prefill
  answer drained (its end releases the prefill half).

Failures follow the aggregated rules: a connect error or a 5xx from either node before the
client got a byte marks **that** node suspect and retries on a new pair decided without it
(``--retries``); a 4xx from the prefill node reaches the client as it is. In the SGLang form
a decode that fails because its prefill failed is blamed on the prefill node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from router_service.domain import RouteDecision
from router_service.gateway.upstream import Response, Target, UpstreamError

log = logging.getLogger(__name__)

PROTOCOLS = ("vllm", "sglang")
"""Hand-over protocols the gateway speaks (``--pd-protocol``)."""
ASK_PREFILL = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
               "remote_block_ids": None, "remote_host": None, "remote_port": None}
"""vLLM: the prefill request's ``kv_transfer_params`` (as vLLM's proxies send them)."""
PREFILL_GRACE_S = 2.0
"""SGLang: how long the request's Complete waits for a prefill answer still out when the
decode has finished (its cached tokens are then reported; past it, none are)."""
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
_ENCODE = msgspec.json.Encoder()


class NodeFailed(Exception):
    """A node failed before the client got a byte: mark it suspect and retry elsewhere."""

    def __init__(self, node_id: str, address: str, why: str, label: str) -> None:
        super().__init__(why)
        self.node_id = node_id
        self.address = address
        self.why = why
        self.label = label
        """``kvroute_gateway_upstream_errors_total`` label: connect, status or midstream."""


class EngineAnswer(Exception):
    """The prefill node refused the request (4xx): its answer goes to the client as it is."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


class PdCore(Protocol):
    """What the forwarder uses of the routing core."""

    def complete_prefill(self, request_id: str) -> bool: ...


@dataclass(slots=True)
class PdResult:
    """One disaggregated attempt's result: the decode node's response (head received) and
    what the prefill node's cache served."""

    response: Response
    prefill_cached: int | None = None
    """``cached_tokens`` of the prefill node's answer (what the core predicted; None when it
    carries none). In the SGLang form the prefill may answer after the decode's head: it is
    then set when that answer is in, and None until then (:meth:`when_prefilled` waits)."""
    prefill_pending: bool = False
    """SGLang: the prefill's answer is not in yet."""
    _waiters: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def when_prefilled(self, fn: Callable[[int | None], None],
                       grace_s: float = PREFILL_GRACE_S) -> None:
        """Call ``fn(prefill_cached)`` once the prefill's answer is in: now when it is, else
        when it comes, or after ``grace_s`` with what is known then (None), so a prefill that
        never answers holds nothing back for long. Called once."""
        if not self.prefill_pending:
            fn(self.prefill_cached)
            return
        fired = False

        def fire() -> None:
            nonlocal fired
            if not fired:
                fired = True
                timer.cancel()
                fn(self.prefill_cached)

        timer = asyncio.get_running_loop().call_later(grace_s, fire)
        self._waiters.append(fire)

    def prefilled(self, cached: int | None) -> None:
        """The prefill's answer is in (``cached``: its cached tokens; None when it failed or
        carried none): run the waiters."""
        self.prefill_cached = cached
        self.prefill_pending = False
        waiters, self._waiters = self._waiters, []
        for fire in waiters:
            fire()


def cached_tokens(body: bytes) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` (or SGLang's ``meta_info.cached_tokens``)
    of a response body or SSE window."""
    hits: list[Any] = _CACHED.findall(body)
    return int(hits[-1]) if hits else None


class PdForwarder:
    """Sends one attempt of a disaggregated request to its pair (module docstring)."""

    def __init__(self, core: PdCore, post: Callable[[Target, str, Mapping[str, str], bytes],
                                                      Any],
                 target: Callable[[str], Target], protocol: str, bootstrap_port: int) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"pd_protocol: must be one of {', '.join(PROTOCOLS)}")
        self.core = core
        self.post = post
        self.target = target
        self.protocol = protocol
        self.bootstrap_port = bootstrap_port
        self._background: set[asyncio.Task[Any]] = set()

    async def attempt(self, d: RouteDecision, path: str, body: dict[str, Any],
                      headers: Mapping[str, str], last: bool) -> PdResult:
        """The decode node's response (head received) for one pair, with the prefill's cached
        tokens; NodeFailed / EngineAnswer / TimeoutError otherwise."""
        if self.protocol == "sglang":
            return await self._sglang(d, path, body, headers, last)
        return await self._vllm(d, path, body, headers, last)

    # -- vLLM: prefill, then decode with the prefill's kv_transfer_params --------------------
    async def _vllm(self, d: RouteDecision, path: str, body: dict[str, Any],
                    headers: Mapping[str, str], last: bool) -> PdResult:
        ask = dict(body, kv_transfer_params=ASK_PREFILL, stream=False, max_tokens=1)
        ask.pop("stream_options", None)
        if "max_completion_tokens" in ask:
            ask["max_completion_tokens"] = 1
        status, data, ctype = await self._whole(d.node_id, d.address, path, headers,
                                                _ENCODE.encode(ask))
        _prefill_status(d, status, data, ctype)
        try:
            params = msgspec.json.decode(data).get("kv_transfer_params")
        except (msgspec.DecodeError, AttributeError):
            params = None
        if not isinstance(params, dict):
            raise NodeFailed(d.node_id, d.address, "the prefill answer carries no "
                             "kv_transfer_params (is the engine a vLLM with a KV connector, "
                             "or should --pd-protocol be sglang?)", "status")
        cached = self._prefilled(d.request_id, data)
        up = await self._decode(d, path, headers, _ENCODE.encode(
            dict(body, kv_transfer_params=params)), last)
        return PdResult(up, cached)

    async def _whole(self, node_id: str, address: str, path: str, headers: Mapping[str, str],
                     raw: bytes) -> tuple[int, bytes, str]:
        up = await send(self.post, self.target(address), node_id, address, path, headers, raw,
                        last=True)
        try:
            data = await up.read()
        except UpstreamError as exc:
            up.close()
            raise NodeFailed(node_id, address, f"prefill answer broken: {exc}",
                             "midstream") from None
        except BaseException:
            up.close()
            raise
        up.release()
        return up.status, data, up.content_type

    def _prefilled(self, rid: str, data: bytes) -> int | None:
        """The prefill's answer is in: release its half in the core; its cached tokens."""
        self.core.complete_prefill(rid)
        return cached_tokens(data)

    async def _decode(self, d: RouteDecision, path: str, headers: Mapping[str, str],
                      raw: bytes, last: bool) -> Response:
        return await send(self.post, self.target(d.decode_address), d.decode_node_id,
                          d.decode_address, path, headers, raw, last, "decode ")

    # -- SGLang: the same body (bootstrap fields added) to both at once ----------------------
    async def _sglang(self, d: RouteDecision, path: str, body: dict[str, Any],
                      headers: Mapping[str, str], last: bool) -> PdResult:
        pre = self.target(d.address)
        raw = _ENCODE.encode(dict(
            body, bootstrap_host=pre.host, bootstrap_port=self.bootstrap_port or pre.port,
            bootstrap_room=random.getrandbits(63)))
        prefill = asyncio.ensure_future(self._whole(d.node_id, d.address, path, headers, raw))
        decode = asyncio.ensure_future(self._decode(d, path, headers, raw, last=True))
        try:
            done, _ = await asyncio.wait({prefill, decode},
                                         return_when=asyncio.FIRST_COMPLETED)
            if prefill in done:
                self._check_prefill(d, prefill)  # raises when the prefill failed
            try:
                up = await decode
            except NodeFailed:
                await self._blame_prefill(d, prefill)
                raise
            if up.status >= 500:
                try:
                    await self._blame_prefill(d, prefill)
                except BaseException:
                    up.close()
                    raise
                if not last:
                    why = f"decode HTTP {up.status}: {await drain(up)!r}"
                    raise NodeFailed(d.decode_node_id, d.decode_address, why, "status")
        except BaseException:
            await _cancel(decode)
            await _cancel(prefill)
            raise
        result = PdResult(up, prefill_pending=True)
        if prefill.done():
            self._finish_prefill(d, prefill, result)
        else:
            self._background.add(prefill)
            prefill.add_done_callback(lambda t: self._finish_prefill(d, t, result))
        return result

    async def _blame_prefill(self, d: RouteDecision,
                             prefill: asyncio.Future[tuple[int, bytes, str]]) -> None:
        """The decode failed: raise the prefill's failure instead when it failed too (the
        decode's failure is then its consequence)."""
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(prefill), 0.5)
        if prefill.done():
            self._check_prefill(d, prefill)

    def _check_prefill(self, d: RouteDecision, task: asyncio.Future[tuple[int, bytes, str]],
                       ) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            raise exc
        _prefill_status(d, *task.result())

    def _finish_prefill(self, d: RouteDecision, task: asyncio.Future[tuple[int, bytes, str]],
                        result: PdResult) -> None:
        self._background.discard(task)
        cached: int | None = None
        try:
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                log.warning("prefill node %s failed after the decode started: %s", d.node_id,
                            exc)
                return
            status, data, _ = task.result()
            if status < 400:
                cached = self._prefilled(d.request_id, data)
            else:
                log.warning("prefill node %s answered HTTP %d after the decode started: %r",
                            d.node_id, status, data[:200])
        finally:
            result.prefilled(cached)


def _prefill_status(d: RouteDecision, status: int, data: bytes, ctype: str) -> None:
    """A prefill answer's status: 5xx blames the prefill node, 4xx is the engine's answer to
    the client."""
    if status >= 500:
        raise NodeFailed(d.node_id, d.address, f"prefill HTTP {status}: {data[:200]!r}",
                         "status")
    if status >= 400:
        raise EngineAnswer(status, data, ctype)


async def send(post: Callable[[Target, str, Mapping[str, str], bytes], Any], target: Target,
               node_id: str, address: str, path: str, headers: Mapping[str, str], raw: bytes,
               last: bool, what: str = "") -> Response:
    """POST ``raw`` to one node and return the response head; NodeFailed when the node cannot
    be reached, or answers 5xx on an attempt that is not the ``last`` (``what`` names the
    half in the reason, e.g. ``"decode "``)."""
    try:
        up: Response = await post(target, path, headers, raw)
    except UpstreamError as exc:
        raise NodeFailed(node_id, address, f"{type(exc).__name__}: {exc}", "connect") from None
    if up.status >= 500 and not last:
        why = f"{what}HTTP {up.status}: {await drain(up)!r}"
        raise NodeFailed(node_id, address, why, "status")
    return up


async def _cancel(task: asyncio.Future[Any]) -> None:
    if task.done():
        if not task.cancelled() and task.exception() is None:
            result = task.result()
            if isinstance(result, Response):
                result.close()
        return
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def drain(up: Response) -> bytes:
    """The first 200 bytes of an answer that is not relayed (the connection is released)."""
    try:
        return (await up.read())[:200]
    except (UpstreamError, TimeoutError):
        return b""
    finally:
        up.release()
