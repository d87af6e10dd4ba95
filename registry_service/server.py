"""``serve(settings)``: the registry process (gRPC + health + reflection + /metrics)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import grpc

from kvroute.aio import run_each, stop_on_signals
from kvroute.grpcutil import add_health_and_reflection, bind, message_size_options, server_options
from kvroute.procs import write_ready_file
from kvroute.settings import describe, parse_hostport
from kvroute.telemetry import MetricsServer
from kvroute.v1 import registry_pb2, registry_pb2_grpc, route_share_pb2_grpc
from registry_service.core import RegistryCore
from registry_service.guard import RegistryGuard
from registry_service.limits import WritePrecheck
from registry_service.metrics import RegistryMetrics
from registry_service.route_share import RouteShareHub, RouteShareSettings
from registry_service.servicer import RegistryServicer
from registry_service.settings import RegistrySettings
from registry_service.share_relay import ShareRelay
from registry_service.share_relay_link import RelayMetrics
from registry_service.store.base import PlacementStore
from registry_service.store.hubs import HubRecord
from registry_service.trim import MemoryTrimmer

log = logging.getLogger(__name__)
SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


def make_store(settings: RegistrySettings) -> PlacementStore:
    """The configured placement store (etcd unless --store memory)."""
    if settings.store == "memory":
        from registry_service.store.memory import MemoryStore
        return MemoryStore()
    from registry_service.store.etcd import EtcdStore
    return EtcdStore(settings.etcd_settings(), chunk_bytes=settings.snapshot_chunk_bytes)


def warn_if_open(settings: RegistrySettings, tokens: int) -> None:
    """Log how callers are authenticated; a loud warning in the open (--auth none) mode."""
    if settings.auth == "none":
        log.warning(
            "registry authentication is OFF (--auth none): any client that reaches %s may "
            "register, heartbeat and deregister any node. Use this for demos and tests only; "
            "in production set --auth required with client certificates (--tls-ca-file) "
            "and/or bearer tokens (--auth-tokens-file)", settings.listen)
        return
    log.info("registry authentication required: client certificates %s (trust domain %s), "
             "%d bearer tokens", "on" if settings.tls_ca_file else "off",
             settings.auth_trust_domain, tokens)
    if not settings.tls_cert_file:
        log.warning("bearer tokens travel over plaintext gRPC (no --tls-cert-file): anyone "
                    "on the network path can read and replay them")


def make_relay(settings: RegistrySettings, store: PlacementStore, hub: RouteShareHub,
               replica: str, port: int, metrics: RegistryMetrics) -> ShareRelay | None:
    """The RouteShare relay to the other registry replicas (None when off or alone; its
    metrics are registered either way)."""
    relay_metrics = RelayMetrics(metrics.registry)
    directory = store.hubs()
    if not settings.share_relay:
        log.warning("route share relay is off (--no-share-relay): routers connected to other "
                    "registry replicas form separate sharing groups")
        return None
    if directory is None:
        log.info("route share relay: the %s store has no peers (single process)", settings.store)
        return None
    own = HubRecord(hub.hub_id, replica, settings.relay_advertise(settings.listen, port),
                    int(time.time() * 1000))
    tls = settings.relay_tls(settings.server_tls)
    if settings.auth == "required" and not (tls.cert_file or tls.token or tls.token_file):
        log.warning("route share relay: this registry requires credentials (--auth required) "
                    "but its relay has none to present to its peers: set --share-relay-token-file "
                    "(a registry:<name> token of the peers' --auth-tokens-file) or a client "
                    "certificate with a registry:<name> identity (--tls-cert-file or "
                    "--share-relay-cert-file); until then routers on other registry replicas do "
                    "not hear this one's")
    return ShareRelay(hub, directory, own, settings, tls, relay_metrics)


async def serve(settings: RegistrySettings, stop: asyncio.Event | None = None) -> int:
    """Run the registry until SIGTERM/SIGINT (or ``stop``); drains and returns 0."""
    stop = stop_on_signals(stop)
    log.info("registry starting: %s", describe(settings))
    metrics = RegistryMetrics()
    core = RegistryCore(settings, make_store(settings), metrics)
    await core.start()
    replica = settings.replica_id or f"{socket.gethostname()}:{os.getpid()}"
    trimmer = MemoryTrimmer(settings.memory_trim_after_bytes)
    core.view.on_drop = lambda entries: trimmer.note(entries * 81)
    guard = RegistryGuard(settings, metrics, trimmer,
                          WritePrecheck(settings, metrics, core.view))
    warn_if_open(settings, len(guard.auth.tokens))
    server = grpc.aio.server(
        options=server_options(*message_size_options(settings.max_message_bytes)),
        interceptors=[guard])
    servicer = RegistryServicer(core, replica)
    registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    hub = RouteShareHub(RouteShareSettings(relay_timeout_s=settings.share_relay_timeout_s),
                        registry=metrics.registry)
    route_share_pb2_grpc.add_RouteShareServicer_to_server(hub, server)  # issue 19
    health = add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, settings.listen, settings.server_tls)
    mhost, mport = parse_hostport(settings.metrics_listen, "metrics_listen")
    metrics_server = MetricsServer(metrics.registry, mhost, mport)
    metrics_port = metrics_server.start()
    await server.start()
    relay = make_relay(settings, core.store, hub, replica, port, metrics)
    if relay is not None:
        await relay.start()
    trimmer.start()
    await health.set_serving(True)
    write_ready_file(settings.ready_file, {"grpc_port": port, "metrics_port": metrics_port,
                                           "pid": os.getpid(), "replica_id": replica})
    log.info("registry %s serving gRPC on port %d, metrics on %d, store %s", replica, port,
             metrics_port, settings.store)
    try:
        await stop.wait()
    finally:
        log.info("registry draining (up to %.1fs)", settings.drain_timeout_s)
        # Peers stop relaying here (our routers move with their streams), then the streams
        # end (routers move to another replica at once), then calls drain. Each step runs
        # also when the task is cancelled during an earlier one: a cancelled relay.stop()
        # skipped the drain and left the port, the store and the metrics server open.
        await run_each(lambda: health.set_serving(False),
                       relay.stop if relay is not None else None, servicer.drain,
                       lambda: server.stop(settings.drain_timeout_s),
                       trimmer.close, core.close, metrics_server.stop)
    log.info("registry stopped")
    return 0
