"""grpc.aio servicer of ``kvroute.v1.Registry`` over a :class:`RegistryCore`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kvroute.errors import KvrouteError, NotFound, Unavailable
from kvroute.grpcutil import stream_errors, unary_errors
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from registry_service.core import RegistryCore

RESYNC_METADATA_KEY = "kvroute-resync-required"
"""Trailing metadata set to ``true`` on a NOT_FOUND heartbeat: register and resync."""

_Ctx = grpc.aio.ServicerContext


class RegistryServicer(pb_grpc.RegistryServicer):
    """Every Registry RPC, adapted to the core (writes) and its reads; validation and status
    codes live there and in ``validate``."""

    def __init__(self, core: RegistryCore, replica_id: str) -> None:
        self.core = core
        self.replica_id = replica_id
        self.block_size = core.settings.block_size
        self._lookup_streams: set[asyncio.Task[Any]] = set()

    async def drain(self) -> None:
        """Shutdown: end watch and lookup streams now so clients move to another replica
        (instead of waiting out the drain timeout on a replica that no longer hears agents)."""
        await self.core.drain()
        for task in list(self._lookup_streams):
            task.cancel()

    def _refuse_when_draining(self) -> None:
        if self.core.draining:
            raise Unavailable(f"registry replica {self.replica_id} is shutting down: use "
                              "another replica")

    @unary_errors
    async def RegisterNode(self, request: pb.RegisterNodeRequest,
                           context: _Ctx[pb.RegisterNodeRequest, pb.RegisterNodeResponse],
                           ) -> pb.RegisterNodeResponse:
        reg = await self.core.register(request)
        return pb.RegisterNodeResponse(
            lease_ttl_s=reg.record.lease_ttl_s, epoch=reg.record.epoch,
            block_size=self.block_size, write_token=reg.write_token,
            heartbeat_interval_s=self.core.settings.effective_heartbeat_interval_s)

    @unary_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: _Ctx[pb.HeartbeatRequest, pb.HeartbeatResponse],
                        ) -> pb.HeartbeatResponse:
        try:
            res = await self.core.heartbeat(request)
        except NotFound:
            self.core.metrics.heartbeats.labels("unknown_node").inc()
            self.core.metrics.resync_requests.labels("unknown_node").inc()
            context.set_trailing_metadata(((RESYNC_METADATA_KEY, "true"),))
            raise
        except KvrouteError:
            self.core.metrics.heartbeats.labels("error").inc()
            raise
        return pb.HeartbeatResponse(resync_required=res.resync_required,
                                    lease_ttl_s=res.lease_ttl_s, reason=res.reason)

    @unary_errors  # type: ignore[misc]
    async def Resync(self, request_iterator: AsyncIterator[pb.ResyncRequest],
                     context: _Ctx[pb.ResyncRequest, pb.ResyncResponse],
                     ) -> pb.ResyncResponse:
        n = await self.core.resync(request_iterator)
        return pb.ResyncResponse(blocks_indexed=n, next_delta_seq=1)

    @unary_errors
    async def DeregisterNode(self, request: pb.DeregisterNodeRequest,
                             context: _Ctx[pb.DeregisterNodeRequest, pb.DeregisterNodeResponse],
                             ) -> pb.DeregisterNodeResponse:
        return pb.DeregisterNodeResponse(blocks_dropped=await self.core.deregister(request))

    def lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        """Answer one Lookup from memory (no etcd call)."""
        return self.core.reads.lookup(request)

    @unary_errors
    async def Lookup(self, request: pb.LookupRequest,
                     context: _Ctx[pb.LookupRequest, pb.LookupResponse]) -> pb.LookupResponse:
        return self.lookup(request)

    @unary_errors  # type: ignore[misc]
    async def LookupStream(  # type: ignore[override]
            self, request_iterator: AsyncIterator[pb.LookupRequest],
            context: _Ctx[pb.LookupRequest, pb.LookupResponse]) -> None:
        # read()/write() on the context: measured ~90 us less per message than an async
        # generator handler on one stream (grpc.aio, loopback)
        self._refuse_when_draining()
        task = asyncio.current_task()
        if task is not None:
            self._lookup_streams.add(task)
            task.add_done_callback(self._lookup_streams.discard)
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            assert isinstance(req, pb.LookupRequest)
            try:
                resp = self.lookup(req)
            except KvrouteError as exc:
                resp = pb.LookupResponse(
                    request_id=req.request_id, block_size=self.block_size,
                    error=pb.ErrorStatus(code=exc.code.value[0], message=exc.message))
            await context.write(resp)

    @unary_errors
    async def ListNodes(self, request: pb.ListNodesRequest,
                        context: _Ctx[pb.ListNodesRequest, pb.ListNodesResponse],
                        ) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=self.core.reads.list_nodes(request.model),
                                    block_size=self.block_size, replica_id=self.replica_id)

    @stream_errors
    async def WatchNodes(self, request: pb.WatchNodesRequest,
                         context: _Ctx[pb.WatchNodesRequest, pb.NodeEvent],
                         ) -> AsyncIterator[pb.NodeEvent]:
        self._refuse_when_draining()
        # aclosing: a cancelled watch unsubscribes now, not when the generator is collected
        async with contextlib.aclosing(
                self.core.reads.watch_nodes(request.model, self.replica_id)) as events:
            async for ev in events:
                yield ev

    @stream_errors
    async def WatchPlacement(self, request: pb.WatchPlacementRequest,
                             context: _Ctx[pb.WatchPlacementRequest, pb.PlacementEvent],
                             ) -> AsyncIterator[pb.PlacementEvent]:
        self._refuse_when_draining()
        # aclosing: a cancelled watch unsubscribes now, not when the generator is collected
        async with contextlib.aclosing(
                self.core.reads.watch_placement(request.model, self.replica_id)) as events:
            async for ev in events:
                yield ev
