"""``kvroute serve router``: build the router from settings and serve until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from kvroute.grpcutil import HealthReporter, add_health_and_reflection, bind
from kvroute.procs import write_ready_file
from kvroute.settings import describe, parse_hostport
from kvroute.telemetry import MetricsServer
from kvroute.v1 import router_pb2, router_pb2_grpc
from router_service.runtime import RoutingRuntime
from router_service.servicer import RouterServicer
from router_service.settings import RouterSettings

log = logging.getLogger(__name__)

DRAIN_REFUSE_S = 0.5
"""On SIGTERM, keep answering (Complete; Route with UNAVAILABLE) at least this long."""
SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


async def drain(s: RouterSettings, servicer: RouterServicer, health: HealthReporter,
                server: grpc.aio.Server) -> None:
    """SIGTERM: health NOT_SERVING; new Route calls and streams are refused with UNAVAILABLE
    (callers retry elsewhere) while running ones finish and Complete keeps working; after
    ``DRAIN_REFUSE_S`` (so callers see the refusal rather than a closed port) and once no Route
    is running, the server stops, giving what is left the rest of ``drain_timeout_s``."""
    t0 = time.monotonic()
    log.info("draining (up to %.1f s): refusing new Route calls", s.drain_timeout_s)
    await health.set_serving(False)
    idle = await servicer.drain(s.drain_timeout_s)
    left = s.drain_timeout_s - (time.monotonic() - t0)
    await asyncio.sleep(max(0.0, min(DRAIN_REFUSE_S, left)))
    left = max(0.0, s.drain_timeout_s - (time.monotonic() - t0))
    await server.stop(left)
    log.info("drained in %.2f s (%s)", time.monotonic() - t0,
             "every Route finished" if idle else f"{servicer.active} Route calls cut off")


async def serve(settings: RouterSettings,
                policy_settings: Mapping[type[Any], Any] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain for ``drain_timeout_s`` and return 0."""
    s = settings
    registry = CollectorRegistry()
    runtime = RoutingRuntime(s, policy_settings, registry)
    core = runtime.core
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=s.max_concurrent_rpcs or None)
    servicer = RouterServicer(core)
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, s.listen, s.server_tls)
    mhost, mport = parse_hostport(s.metrics_listen, "metrics_listen")
    metrics_server = MetricsServer(registry, mhost, mport)
    await runtime.start()
    await server.start()
    bound_metrics = metrics_server.start()
    await health.set_serving(True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    write_ready_file(s.ready_file, {"grpc_port": port, "metrics_port": bound_metrics,
                                    "pid": os.getpid()})
    log.info("router serving on port %d (metrics %d): %s; settings %s", port, bound_metrics,
             core.describe(), describe(s))
    await stop.wait()
    await drain(s, servicer, health, server)
    await runtime.stop()
    with contextlib.suppress(Exception):
        metrics_server.stop()
    log.info("router stopped")
    return 0
