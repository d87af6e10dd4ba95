"""``kvroute.v1.Router`` over gRPC: Route, RouteStream, Complete, Stats.

Thin: each call converts protobuf to the core's types (:mod:`.proto_adapter`), calls
:class:`RouterCore`, and converts back.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kvroute.errors import KvrouteError
from kvroute.grpcutil import stream_errors, unary_errors
from kvroute.telemetry import REQUEST_ID
from kvroute.v1 import router_pb2, router_pb2_grpc
from router_service import proto_adapter as pa
from router_service.core import RouterCore

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]


class RouterServicer(router_pb2_grpc.RouterServicer):
    """gRPC front of :class:`RouterCore`; no request can crash it."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core

    @unary_errors
    async def Route(self, request: router_pb2.RouteRequest, context: Ctx,
                    ) -> router_pb2.RouteResponse:
        """One routing decision."""
        return pa.to_route_response(await self.core.decide(pa.to_route_request(request)))

    @stream_errors
    async def RouteStream(self, request_iterator: AsyncIterator[router_pb2.RouteRequest],
                          context: Ctx) -> AsyncIterator[router_pb2.RouteResponse]:
        """Decisions in request order; a bad request gets a reply with ``error`` set."""
        decide = self.core.decide
        async for req in request_iterator:
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
