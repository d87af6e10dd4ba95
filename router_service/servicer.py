"""``kvroute.v1.Router`` over gRPC: Route, RouteStream, Complete, Stats.

Thin: each call converts protobuf to the core's types (:mod:`.proto_adapter`), calls
:class:`RouterCore`, and converts back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kvroute.errors import KvrouteError, Unavailable
from kvroute.grpcutil import stream_errors, unary_errors
from kvroute.telemetry import REQUEST_ID
from kvroute.v1 import router_pb2, router_pb2_grpc
from router_service import proto_adapter as pa
from router_service.core import RouterCore
from router_service.domain import RouteDecision

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]


class RouterServicer(router_pb2_grpc.RouterServicer):
    """gRPC front of :class:`RouterCore`; no request can crash it."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self.abandoned = 0
        """Decisions released because their caller gave up before receiving them."""
        self.draining = False
        """Set on SIGTERM: new Route calls and streams are refused with UNAVAILABLE (callers
        retry on another router); calls already running finish; Complete is still served."""
        self.active = 0
        """Route calls and RouteStream streams running now."""
        self._idle = asyncio.Event()
        self._idle.set()

    def _enter(self) -> None:
        if self.draining:
            raise Unavailable("this router is shutting down (SIGTERM): send the request to "
                              "another router replica")
        self.active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.active -= 1
        if not self.active:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new Route calls and wait (up to ``timeout_s``) for running ones; True when
        none is left."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()

    @unary_errors
    async def Route(self, request: router_pb2.RouteRequest, context: Ctx,
                    ) -> router_pb2.RouteResponse:
        """One routing decision (released again if the caller gives up before the answer)."""
        self._enter()
        try:
            decision = await self.core.decide(pa.to_route_request(request))
        finally:
            self._leave()
        left = context.time_remaining()
        if left is not None and left <= 0:  # the caller gave up while we decided
            self._abandon(decision)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                "the caller's deadline passed before the decision was made "
                                "(the router is overloaded); the decision was released")
        # grpc-stubs types the callback as a class; any callable(ctx) works
        context.add_done_callback(
            lambda ctx: self._release_if_abandoned(ctx, decision))  # type: ignore[arg-type]
        return pa.to_route_response(decision)

    def _release_if_abandoned(self, context: Ctx, decision: RouteDecision) -> None:
        if context.cancelled():  # deadline passed or call cancelled: nobody uses the decision
            self._abandon(decision)

    def _abandon(self, decision: RouteDecision) -> None:
        with contextlib.suppress(KvrouteError):
            if self.core.complete(decision.request_id, success=False):
                self.abandoned += 1

    @stream_errors
    async def RouteStream(self, request_iterator: AsyncIterator[router_pb2.RouteRequest],
                          context: Ctx) -> AsyncIterator[router_pb2.RouteResponse]:
        """Decisions in request order; a bad request gets a reply with ``error`` set.
        On SIGTERM the stream ends after the answer in progress (UNAVAILABLE: reconnect to
        another router)."""
        self._enter()
        try:
            async for resp in self._route_stream(request_iterator):
                yield resp
        finally:
            self._leave()

    async def _route_stream(self, request_iterator: AsyncIterator[router_pb2.RouteRequest],
                            ) -> AsyncIterator[router_pb2.RouteResponse]:
        decide = self.core.decide
        async for req in request_iterator:
            if self.draining:
                raise Unavailable("this router is shutting down (SIGTERM): open the stream "
                                  "on another router replica")
            try:
                yield pa.to_route_response(await decide(pa.to_route_request(req)))
            except KvrouteError as exc:
                yield router_pb2.RouteResponse(
                    request_id=req.request_id,
                    error=router_pb2.RouteError(code=exc.code.value[0], message=exc.message))
            except Exception as exc:
                token = REQUEST_ID.set(req.request_id)
                log.exception("unexpected error routing a stream message")
                REQUEST_ID.reset(token)
                yield router_pb2.RouteResponse(
                    request_id=req.request_id,
                    error=router_pb2.RouteError(code=grpc.StatusCode.INTERNAL.value[0],
                                                message=f"internal error: {exc!r}"))

    @unary_errors
    async def Complete(self, request: router_pb2.CompleteRequest, context: Ctx,
                       ) -> router_pb2.CompleteResponse:
        """Release in-flight load of a finished request."""
        return pa.complete(self.core, request)

    @unary_errors
    async def Stats(self, request: router_pb2.StatsRequest, context: Ctx,
                    ) -> router_pb2.StatsResponse:
        """Counters and state."""
        return pa.stats(self.core)
