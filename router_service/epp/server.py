"""``kvroute serve epp``: the ext_proc endpoint picker with the routing core in-process."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import aiohttp
import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from prometheus_client import CollectorRegistry

from kvroute.aio import run_each, stop_on_signals
from kvroute.grpcutil import add_health_and_reflection, bind, message_size_options, server_options
from kvroute.procs import write_ready_file
from kvroute.settings import describe, parse_hostport
from kvroute.telemetry import MetricsServer
from router_service.epp import protocol
from router_service.epp.metrics import EppMetrics
from router_service.epp.servicer import ExternalProcessorServicer
from router_service.epp.settings import EppSettings
from router_service.prompt_tokens import EngineTokenizer, PromptTokens, TokenCache
from router_service.runtime import RoutingRuntime

log = logging.getLogger(__name__)

HEALTH_SERVICES = (protocol.EXT_PROC_SERVICE, "liveness", "readiness")
"""gRPC health service names of the protocol (plus "" for the whole server)."""


async def serve(settings: EppSettings,
                policy_settings: Mapping[type[Any], Any] | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain for ``drain_timeout_s`` and
    return 0. Every shutdown step runs, also when an earlier one failed or the task was
    cancelled during one (the first error is raised after the last step)."""
    s = settings
    registry = CollectorRegistry()
    runtime = RoutingRuntime(s, policy_settings, registry)
    metrics = EppMetrics(registry)
    # a buffered body arrives in one gRPC message: allow the largest body plus headers
    server = grpc.aio.server(options=server_options(
        ("grpc.so_reuseport", 0), *message_size_options(s.max_body_bytes + (1 << 20))))
    session = aiohttp.ClientSession(skip_auto_headers=("User-Agent",))
    tokens = (PromptTokens({}, EngineTokenizer(session), TokenCache(s.tokenize_cache_entries))
              if s.engine_tokenize else None)
    ep_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessorServicer(runtime.core, s, metrics, tokens), server)
    health = add_health_and_reflection(server, list(HEALTH_SERVICES))
    port = bind(server, s.listen, s.server_tls)
    mhost, mport = parse_hostport(s.metrics_listen, "metrics_listen")
    metrics_server = MetricsServer(registry, mhost, mport)
    await runtime.start()
    await server.start()
    bound_metrics = metrics_server.start()
    await health.set_serving(True)
    stop = stop_on_signals(stop)
    write_ready_file(s.ready_file, {"grpc_port": port, "metrics_port": bound_metrics,
                                    "pid": os.getpid()})
    log.info("endpoint picker serving ext_proc on port %d (metrics %d); settings %s", port,
             bound_metrics, describe(s))
    try:
        await stop.wait()
    finally:
        log.info("draining (up to %.1f s)", s.drain_timeout_s)
        await run_each(lambda: health.set_serving(False),
                       lambda: server.stop(s.drain_timeout_s), runtime.stop, session.close,
                       metrics_server.stop)
    log.info("endpoint picker stopped")
    return 0
