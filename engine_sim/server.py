"""Entry of ``kvroute serve engine-sim``: HTTP API + ZMQ KV events until SIGTERM.

Writes ``{"http_port", "events_port", "replay_port", "metrics_port", "pid", ...}`` to
``--ready-file`` once serving (no ``grpc_port``: engine_sim has no gRPC server; ``--listen`` is the
HTTP address). ``--engines N`` serves N independent engines from this one process — each with its
own HTTP port, ZMQ event and replay sockets, metrics port and cache — listed under ``engines`` in
the ready file: a whole simulated fleet at the CPU cost of one process. SIGTERM or SIGINT stops
accepting, lets in-flight requests finish for up to
``--drain-timeout-s``, closes the sockets and exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import ssl
from typing import Any

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


class _Served:
    """One engine of this process and the servers that expose it."""

    def __init__(self, settings: EngineSimSettings) -> None:
        self.settings = settings
        self.engine = SimEngine(settings)
        registry = make_registry(self.engine)
        # handler_cancellation: a client that goes away cancels its handler, which aborts its
        # engine request (vLLM's routes are with_cancellation); without it aiohttp lets the
        # handler run on, and a non-streaming request kept its blocks until it finished
        self.runner = web.AppRunner(make_app(self.engine, registry), access_log=None,
                                    handler_cancellation=True,
                                    shutdown_timeout=settings.drain_timeout_s)
        self.metrics = MetricsServer(registry,
                                     *parse_hostport(settings.metrics_listen, "metrics_listen"))

    async def start(self) -> dict[str, Any]:
        """Bind everything; the engine's ready-file entry."""
        await self.engine.start()
        await self.runner.setup()
        host, port = parse_hostport(self.settings.listen, "listen")
        site = web.TCPSite(self.runner, host, port, ssl_context=_ssl_context(self.settings))
        await site.start()
        server = site._server  # aiohttp exposes the bound sockets only here
        sockets = getattr(server, "sockets", None) or []
        http_port = int(sockets[0].getsockname()[1]) if sockets else port
        pub = self.engine.publisher
        return {
            "http_port": http_port,
            "metrics_port": self.metrics.start(),
            "events_port": endpoint_port(pub.bound_endpoint),
            "replay_port": endpoint_port(pub.bound_replay_endpoint),
            "events_endpoint": pub.bound_endpoint,
            "replay_endpoint": pub.bound_replay_endpoint,
        }

    async def stop(self) -> None:
        """Drain HTTP, stop the engine, close the sockets."""
        try:
            await self.runner.cleanup()
            await self.engine.stop()
        finally:
            self.metrics.stop()


async def serve(settings: EngineSimSettings, stop: asyncio.Event) -> None:
    """Serve ``settings.engines`` engines until ``stop`` is set.

    The ready file holds engine 0's ports at the top level (the single-engine format) and every
    engine's under ``engines``.
    """
    served = [_Served(settings.for_engine(i)) for i in range(settings.engines)]
    try:
        entries = [await s.start() for s in served]
        ready = {**entries[0], "engines": entries, "pid": os.getpid()}
        write_ready_file(settings.ready_file, ready)
        log.info("engine-sim serving %d engine(s)", len(served), extra={"ready": ready})
        await stop.wait()
        log.info("engine-sim stopping")
    finally:
        await asyncio.gather(*(s.stop() for s in served), return_exceptions=True)


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
