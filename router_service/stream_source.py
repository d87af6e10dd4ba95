"""Registry link, stream mode: one persistent ``Registry.LookupStream`` per router.

Lookups are written to the stream with a request id and matched to replies by id; each waits at
most ``lookup_timeout_s``. The stream reconnects with jittered back-off; while it is down lookups
fail fast with Unavailable (the router degrades). The node list (for degraded routing, Stats and
candidate narrowing) comes from lookup replies and from ``ListNodes``, refreshed every
``node_cache_ttl_s`` with a deadline and retries.

Two kinds of lookup: :meth:`StreamSource.lookup` asks for every node of the model (the
registry's default answer, one NodeMatch per node); :meth:`StreamSource.matches` asks with
``matched_only`` for just the nodes holding a prefix and the model's node count, so on a large
fleet neither the registry's answer nor this router's handling of it grows with the nodes that
match nothing (the core narrows the candidates with the node list, as in mirror mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from kvroute.aio import cancel_and_wait
from kvroute.errors import (
    FailedPrecondition,
    InvalidArgument,
    KvrouteError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from kvroute.grpcutil import message_size_options, open_channel
from kvroute.settings import TLSSettings
from kvroute.targets import TargetRing
from kvroute.v1 import registry_pb2, registry_pb2_grpc
from router_service.placement import DepartureHook, NodeState, Placement
from router_service.retry import (
    LinkLog,
    LinkNeverUp,
    call_retrying,
    reconnect_options,
    reconnect_retrying,
)

log = logging.getLogger(__name__)

_ERRORS: dict[int, type[KvrouteError]] = {
    grpc.StatusCode.INVALID_ARGUMENT.value[0]: InvalidArgument,
    grpc.StatusCode.NOT_FOUND.value[0]: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION.value[0]: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: ResourceExhausted,
}


def _ignore(node_id: str) -> None:
    pass


class StreamSource:
    """Lookups over one persistent bidirectional stream, with a short-TTL node cache."""

    mode = "stream"
    local = False

    def __init__(self, target: str, tls: TLSSettings | None = None, *,
                 lookup_timeout_s: float = 0.25, call_timeout_s: float = 2.0,
                 retry_max_s: float = 2.0, node_cache_ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ring = TargetRing(target)
        self._tls = tls
        self._lookup_timeout_s = lookup_timeout_s
        self._call_timeout_s = call_timeout_s
        self._retry_max_s = retry_max_s
        self._ttl = node_cache_ttl_s
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._queue: asyncio.Queue[registry_pb2.LookupRequest] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[registry_pb2.LookupResponse]] = {}
        self._ids = itertools.count(1)
        self._connected = False
        self._last_ok = clock()
        self._nodes: dict[str, NodeState] = {}
        self._members: dict[str, list[NodeState]] = {}
        """Per model: its nodes in the cache; dropped whenever the cache's membership changes
        (a reply about a known node updates its NodeState in place)."""
        self._departed: DepartureHook = _ignore
        self._nodes_at = float("-inf")
        self._block_size = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._link_log = LinkLog(target, "lookup stream (stream mode)")

    def _open(self) -> grpc.aio.Channel:
        return open_channel(
            self._ring.current, self._tls,
            [*message_size_options(64 << 20), *reconnect_options(self._retry_max_s)])

    async def _next_registry(self) -> None:
        """After a stream failure with several registry addresses: use the next one."""
        if len(self._ring) < 2:
            return
        old, self._channel = self._channel, None
        log.warning("registry %s failed; trying %s", self._ring.current, self._ring.advance())
        self._channel = self._open()
        if old is not None:
            await old.close(None)

    async def start(self) -> None:
        """Connect in the background."""
        self._channel = self._open()
        self._tasks = [asyncio.create_task(self._run(), name="lookup-stream"),
                       asyncio.create_task(self._refresh_nodes_loop(), name="node-cache")]

    async def stop(self) -> None:
        """Stop and close."""
        tasks, self._tasks = self._tasks, []
        try:
            await cancel_and_wait(*tasks)
        finally:  # also when the caller is cancelled while waiting
            channel, self._channel = self._channel, None
            if channel is not None:
                await channel.close(None)

    @property
    def connected(self) -> bool:
        """True while the lookup stream is up."""
        return self._connected

    def staleness_s(self) -> float:
        """0 while the stream is up; otherwise seconds since the last registry answer."""
        return 0.0 if self._connected else self._clock() - self._last_ok

    def registry_block_size(self) -> int:
        """Block size from the registry's replies (0 = unknown)."""
        return self._block_size

    def last_known(self) -> list[NodeState]:
        """Nodes from the latest ListNodes / lookup replies."""
        return list(self._nodes.values())

    def nodes_known(self) -> int:
        """Nodes in the cache."""
        return len(self._nodes)

    def lookup_local(self, block_hashes: Sequence[int], model: str) -> Placement:
        """Not available: every lookup is a registry round trip (use :meth:`lookup`)."""
        raise NotImplementedError("stream mode looks placement up over the network")

    def members(self, model: str) -> list[NodeState]:
        """Nodes of ``model`` in the node cache (a cached list; do not modify)."""
        got = self._members.get(model)
        if got is None:
            got = [n for n in self._nodes.values() if n.model == model]
            self._members[model] = got
        return got

    def node(self, node_id: str) -> NodeState | None:
        """A node of the cache by id."""
        return self._nodes.get(node_id)

    def on_departure(self, hook: DepartureHook) -> None:
        """Call ``hook(node_id)`` for each cached node that leaves: missing from a ListNodes
        refresh, or from a lookup answer listing every node of its model."""
        self._departed = hook

    def _absorb(self, m: registry_pb2.NodeMatch, model: str) -> NodeState:
        """A reply's fresh state of a node into the cache (in place when known)."""
        st = NodeState.from_match(m, model)
        old = self._nodes.get(st.node_id)
        if old is not None and old.model == model:
            old.update_from(st)
            return old
        self._nodes[st.node_id] = st
        self._members.clear()
        return st

    def _drop(self, node_id: str) -> None:
        if self._nodes.pop(node_id, None) is not None:
            self._members.clear()
            self._departed(node_id)

    async def lookup(self, block_hashes: Sequence[int], model: str) -> Placement:
        """Every node of ``model`` with its match; Unavailable when the registry cannot answer
        in time."""
        resp = await self._ask(block_hashes, model, matched_only=False)
        nodes = [(self._absorb(m, model), m.matched_blocks) for m in resp.nodes]
        listed = {n.node_id for n, _ in nodes}
        for n in [n for n in self.members(model) if n.node_id not in listed]:
            self._drop(n.node_id)  # the answer lists every node of the model: this one left
        offloaded = {m.node_id: m.offloaded_blocks for m in resp.nodes if m.offloaded_blocks}
        return Placement(nodes, resp.block_size, offloaded)

    async def matches(self, block_hashes: Sequence[int], model: str,
                      ) -> tuple[dict[str, int], int, dict[str, int]]:
        """Only the nodes of ``model`` holding a prefix on some tier (node id -> matched
        device blocks; their state refreshed in the cache), how many nodes the model has in
        the registry, and node id -> offloaded blocks continuing the device prefix."""
        resp = await self._ask(block_hashes, model, matched_only=True)
        out = {self._absorb(m, model).node_id: m.matched_blocks
               for m in resp.nodes if m.matched_blocks or m.offloaded_blocks}
        offloaded = {m.node_id: m.offloaded_blocks for m in resp.nodes if m.offloaded_blocks}
        total = resp.model_nodes
        if not total and resp.nodes:  # a registry older than matched_only listed them all
            total = len(resp.nodes)
        return out, total, offloaded

    async def _ask(self, block_hashes: Sequence[int], model: str, *, matched_only: bool,
                   ) -> registry_pb2.LookupResponse:
        if not self._connected:
            raise Unavailable("registry lookup stream is down")
        rid = str(next(self._ids))
        fut: asyncio.Future[registry_pb2.LookupResponse] = \
            asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        # every node of the model, healthy or not (the Placement contract): the router tells
        # "served, but no healthy node" (UNAVAILABLE) from "not served" (NOT_FOUND)
        self._queue.put_nowait(registry_pb2.LookupRequest(
            block_hashes=block_hashes, model=model, request_id=rid, include_unhealthy=True,
            matched_only=matched_only))
        try:
            async with asyncio.timeout(self._lookup_timeout_s):
                resp = await fut
        except TimeoutError:
            raise Unavailable(f"registry lookup took over {self._lookup_timeout_s:g} s") from None
        finally:
            self._pending.pop(rid, None)
        if resp.error.code:
            cls = _ERRORS.get(resp.error.code, Unavailable)
            raise cls(f"registry: {resp.error.message}")
        self._block_size = resp.block_size or self._block_size
        return resp

    # -- background -----------------------------------------------------------------------
    async def _writer(self, call: Any, queue: asyncio.Queue[registry_pb2.LookupRequest]) -> None:
        """The only writer of one stream call (grpc allows one pending write at a time)."""
        while True:
            await call.write(await queue.get())

    async def _run(self) -> None:
        while True:
            try:
                async for attempt in reconnect_retrying(self._retry_max_s):
                    with attempt:
                        await self._stream_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lookup stream failed; reconnecting")
                await asyncio.sleep(self._retry_max_s)

    async def _stream_once(self) -> None:
        assert self._channel is not None
        stub: Any = registry_pb2_grpc.RegistryStub(self._channel)
        queue: asyncio.Queue[registry_pb2.LookupRequest] = asyncio.Queue()
        self._queue = queue
        call: Any = stub.LookupStream()
        writer: asyncio.Task[None] | None = None
        was_up = False
        try:
            async with asyncio.timeout(self._call_timeout_s):
                await call.wait_for_connection()
            writer = asyncio.create_task(self._writer(call, queue), name="lookup-writer")
            was_up = self._connected = True
            self._link_log.up()
            log.info("registry lookup stream up")
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:  # type: ignore[attr-defined]
                    break
                self._last_ok = self._clock()
                fut = self._pending.get(resp.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            await self._next_registry()
            if not was_up:
                self._link_log.failed(exc)
                raise LinkNeverUp(str(exc)) from exc
            log.warning("registry lookup stream lost: %s", exc)
        finally:
            if self._connected:
                self._last_ok = self._clock()
            self._connected = False
            call.cancel()
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(BaseException):
                    await writer
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(Unavailable("registry lookup stream lost"))
        if not was_up:
            ended = LinkNeverUp("lookup stream ended before it was up")
            self._link_log.failed(ended)
            raise ended

    async def _refresh_nodes_loop(self) -> None:
        while True:
            if self._clock() - self._nodes_at >= self._ttl:
                with contextlib.suppress(Exception):
                    await self.refresh_nodes()
            await asyncio.sleep(min(self._ttl, 1.0))

    async def refresh_nodes(self) -> None:
        """ListNodes with a deadline and jittered retries; replaces the node cache."""
        assert self._channel is not None
        stub = registry_pb2_grpc.RegistryStub(self._channel)
        async for attempt in call_retrying():
            with attempt:
                resp = await stub.ListNodes(registry_pb2.ListNodesRequest(),
                                            timeout=self._call_timeout_s)
        fresh = {n.node_id: NodeState.from_info(n) for n in resp.nodes}
        gone = self._nodes.keys() - fresh.keys()
        self._nodes = fresh
        self._members.clear()
        for node_id in gone:
            self._departed(node_id)
        self._block_size = resp.block_size or self._block_size
        self._nodes_at = self._last_ok = self._clock()
