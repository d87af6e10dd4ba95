"""``serve(settings)``: the registry process (gRPC + health + reflection + /metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

import grpc

from kvroute.grpcutil import add_health_and_reflection, bind, message_size_options
from kvroute.procs import write_ready_file
from kvroute.settings import describe, parse_hostport
from kvroute.telemetry import MetricsServer
from kvroute.v1 import registry_pb2, registry_pb2_grpc, route_share_pb2_grpc
from registry_service.core import RegistryCore
from registry_service.metrics import RegistryMetrics
from registry_service.route_share import RouteShareHub
from registry_service.servicer import RegistryServicer
from registry_service.settings import RegistrySettings
from registry_service.store.base import PlacementStore

log = logging.getLogger(__name__)
SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


def make_store(settings: RegistrySettings) -> PlacementStore:
    """The configured placement store (etcd unless --store memory)."""
    if settings.store == "memory":
        from registry_service.store.memory import MemoryStore
        return MemoryStore()
    from registry_service.store.etcd import EtcdStore
    return EtcdStore(settings.etcd_settings(), chunk_bytes=settings.snapshot_chunk_bytes)


async def serve(settings: RegistrySettings, stop: asyncio.Event | None = None) -> int:
    """Run the registry until SIGTERM/SIGINT (or ``stop``); drains and returns 0."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    log.info("registry starting: %s", describe(settings))
    metrics = RegistryMetrics()
    core = RegistryCore(settings, make_store(settings), metrics)
    await core.start()
    replica = settings.replica_id or f"{socket.gethostname()}:{os.getpid()}"
    server = grpc.aio.server(options=message_size_options(settings.max_message_bytes))
    registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(core, replica), server)
    route_share_pb2_grpc.add_RouteShareServicer_to_server(
        RouteShareHub(registry=metrics.registry), server)  # issue 19: router replicas' deltas
    health = add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, settings.listen, settings.server_tls)
    mhost, mport = parse_hostport(settings.metrics_listen, "metrics_listen")
    metrics_server = MetricsServer(metrics.registry, mhost, mport)
    metrics_port = metrics_server.start()
    await server.start()
    await health.set_serving(True)
    write_ready_file(settings.ready_file, {"grpc_port": port, "metrics_port": metrics_port,
                                           "pid": os.getpid(), "replica_id": replica})
    log.info("registry %s serving gRPC on port %d, metrics on %d, store %s", replica, port,
             metrics_port, settings.store)
    try:
        await stop.wait()
    finally:
        log.info("registry draining (up to %.1fs)", settings.drain_timeout_s)
        await health.set_serving(False)
        await server.stop(settings.drain_timeout_s)
        await core.close()
        metrics_server.stop()
    log.info("registry stopped")
    return 0
