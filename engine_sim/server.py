"""Entry of ``kvroute serve engine-sim``: HTTP API + ZMQ KV events until SIGTERM.

Writes ``{"http_port", "events_port", "replay_port", "metrics_port", "pid", ...}`` to
``--ready-file`` once serving (no ``grpc_port``: engine_sim has no gRPC server; ``--listen`` is the
HTTP address). SIGTERM or SIGINT stops accepting, lets in-flight requests finish for up to
``--drain-timeout-s``, closes the sockets and exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import ssl

from aiohttp import web

from engine_sim.engine import SimEngine
from engine_sim.events import endpoint_port
from engine_sim.http_api import make_app
from engine_sim.metrics import make_registry
from engine_sim.settings import EngineSimSettings
from kvroute.procs import write_ready_file
from kvroute.settings import parse_hostport
from kvroute.telemetry import MetricsServer, configure_logging

log = logging.getLogger(__name__)


def _ssl_context(settings: EngineSimSettings) -> ssl.SSLContext | None:
    """HTTPS for the API when a certificate is configured (mTLS when a CA is too)."""
    if not settings.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(settings.tls_ca_file)
    return ctx


async def serve(settings: EngineSimSettings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    engine = SimEngine(settings)
    await engine.start()
    registry = make_registry(engine)
    runner = web.AppRunner(make_app(engine, registry), access_log=None,
                           shutdown_timeout=settings.drain_timeout_s)
    metrics = MetricsServer(registry, *parse_hostport(settings.metrics_listen, "metrics_listen"))
    try:
        await runner.setup()
        host, port = parse_hostport(settings.listen, "listen")
        site = web.TCPSite(runner, host, port, ssl_context=_ssl_context(settings))
        await site.start()
        server = site._server  # aiohttp exposes the bound sockets only here
        sockets = getattr(server, "sockets", None) or []
        http_port = int(sockets[0].getsockname()[1]) if sockets else port
        metrics_port = metrics.start()
        ready = {
            "http_port": http_port,
            "metrics_port": metrics_port,
            "events_port": endpoint_port(engine.publisher.bound_endpoint),
            "replay_port": endpoint_port(engine.publisher.bound_replay_endpoint),
            "events_endpoint": engine.publisher.bound_endpoint,
            "replay_endpoint": engine.publisher.bound_replay_endpoint,
            "pid": os.getpid(),
        }
        write_ready_file(settings.ready_file, ready)
        log.info("engine-sim serving", extra={"ready": ready})
        await stop.wait()
        log.info("engine-sim stopping")
    finally:
        await runner.cleanup()
        await engine.stop()
        metrics.stop()


def run(settings: EngineSimSettings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (0 on a clean stop)."""
    configure_logging(settings.log_format, settings.log_level)
    log.info("engine-sim settings: %s", dataclasses.asdict(settings))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
    return 0
