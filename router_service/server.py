"""``kvroute serve router``: build the router from settings and serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from kvroute.aio import cancel_and_wait, run_each, stop_on_signals
from kvroute.grpcutil import HealthReporter, add_health_and_reflection, bind, server_options
from kvroute.procs import write_ready_file
from kvroute.settings import describe, parse_hostport
from kvroute.telemetry import MetricsServer
from kvroute.v1 import router_pb2, router_pb2_grpc
from router_service.core import RouterCore
from router_service.runtime import RoutingRuntime
from router_service.servicer import RouterServicer
from router_service.settings import RouterSettings

log = logging.getLogger(__name__)

DRAIN_REFUSE_S = 0.5
"""On SIGTERM, keep answering (Complete; Route with UNAVAILABLE) at least this long."""
SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
LIVENESS_SERVICE = "liveness"
"""Health service that is SERVING while the process serves (liveness and startup probes);
the server ("") and kvroute.v1.Router are NOT_SERVING until the router has known a node."""


async def _serving_once_a_node_is_known(core: RouterCore, health: HealthReporter,
                                        poll_s: float = 0.1) -> None:
    """Report SERVING from the first moment the router knows a node, and stay so.

    Until then every Route would fail (nothing to route to), so readiness must fail too. Once
    a node was known, a lost registry link degrades routing to the last known nodes instead,
    and health stays SERVING.
    """
    while True:
        if core.known_nodes():
            break
        await asyncio.sleep(poll_s)
    await health.set_serving(True)
    log.info("router ready: %d node(s) known; gRPC health SERVING", len(core.known_nodes()))


async def drain(s: RouterSettings, servicer: RouterServicer, health: HealthReporter,
                server: grpc.aio.Server) -> None:
    """SIGTERM: health NOT_SERVING; new Route calls and streams are refused with UNAVAILABLE
    (callers retry elsewhere) while running ones finish and Complete keeps working; after
    ``DRAIN_REFUSE_S`` (so callers see the refusal rather than a closed port) and once no Route
    is running, the server stops, giving what is left the rest of ``drain_timeout_s``. The
    server stops also when an earlier step failed or the caller was cancelled in it."""
    t0 = time.monotonic()
    idle: list[bool] = []
    log.info("draining (up to %.1f s): refusing new Route calls", s.drain_timeout_s)

    async def refuse_while_running() -> None:
        idle.append(await servicer.drain(s.drain_timeout_s))
        left = s.drain_timeout_s - (time.monotonic() - t0)
        await asyncio.sleep(max(0.0, min(DRAIN_REFUSE_S, left)))

    def stop_server() -> Awaitable[None]:
        return server.stop(max(0.0, s.drain_timeout_s - (time.monotonic() - t0)))

    await run_each(lambda: health.set_serving(False), refuse_while_running, stop_server)
    log.info("drained in %.2f s (%s)", time.monotonic() - t0,
             "every Route finished" if all(idle) else f"{servicer.active} Route calls cut off")


async def serve(settings: RouterSettings,
                policy_settings: Mapping[type[Any], Any] | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain for ``drain_timeout_s`` and
    return 0. Every shutdown step runs, also when an earlier one failed or the task was
    cancelled during one (the first error is raised after the last step)."""
    s = settings
    registry = CollectorRegistry()
    runtime = RoutingRuntime(s, policy_settings, registry)
    core = runtime.core
    server = grpc.aio.server(options=server_options(("grpc.so_reuseport", 0)),
                             maximum_concurrent_rpcs=s.max_concurrent_rpcs or None)
    servicer = RouterServicer(core)
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    await health.set_serving(False)  # grpc's servicer starts "" as SERVING
    port = bind(server, s.listen, s.server_tls)
    mhost, mport = parse_hostport(s.metrics_listen, "metrics_listen")
    metrics_server = MetricsServer(registry, mhost, mport)
    await runtime.start()
    await server.start()
    bound_metrics = metrics_server.start()
    await health.servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    ready = asyncio.create_task(_serving_once_a_node_is_known(core, health), name="readiness")
    stop = stop_on_signals(stop)
    write_ready_file(s.ready_file, {"grpc_port": port, "metrics_port": bound_metrics,
                                    "pid": os.getpid()})
    log.info("router serving on port %d (metrics %d; gRPC health NOT_SERVING until a node is "
             "known): %s; settings %s", port, bound_metrics, core.describe(), describe(s))
    try:
        await stop.wait()
    finally:
        await run_each(
            lambda: cancel_and_wait(ready),
            lambda: health.servicer.set(LIVENESS_SERVICE,
                                        health_pb2.HealthCheckResponse.NOT_SERVING),
            lambda: drain(s, servicer, health, server), runtime.stop, metrics_server.stop)
    log.info("router stopped")
    return 0
