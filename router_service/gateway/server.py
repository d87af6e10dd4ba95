"""``kvroute serve gateway``: the routing core plus the OpenAI HTTP front, until SIGTERM.

Writes ``{"http_port", "metrics_port", "pid"}`` to ``--ready-file`` once serving. SIGTERM stops
accepting new connections, lets requests in flight finish for up to ``--drain-timeout-s``, then
stops the registry link and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from kvroute.aio import run_each, stop_on_signals
from kvroute.errors import ConfigError
from kvroute.procs import write_ready_file
from kvroute.settings import describe, parse_hostport
from kvroute.telemetry import MetricsServer
from router_service.chat_template import ModelTokenizer
from router_service.gateway.app import make_app
from router_service.gateway.metrics import GatewayMetrics
from router_service.gateway.proxy import Proxy
from router_service.gateway.settings import GatewaySettings, parse_tokenizer_dirs
from router_service.gateway.upstream import Upstream
from router_service.model_catalog import ModelCatalog
from router_service.prompt_tokens import EngineTokenizer, LocalTokenizer, PromptTokens, TokenCache
from router_service.runtime import RoutingRuntime

log = logging.getLogger(__name__)


def server_ssl(s: GatewaySettings) -> ssl.SSLContext | None:
    """HTTPS for the API when a certificate is configured (mTLS when a CA is too)."""
    if not s.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(s.tls_cert_file, s.tls_key_file)
    if s.tls_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(s.tls_ca_file)
    return ctx


def upstream_ssl(s: GatewaySettings) -> ssl.SSLContext | bool:
    """TLS towards engines (``--upstream-tls``), verified with the client CA when given."""
    if not s.upstream_tls:
        return False
    ctx = ssl.create_default_context(cafile=s.client_tls_ca_file or None)
    if s.client_tls_cert_file:
        ctx.load_cert_chain(s.client_tls_cert_file, s.client_tls_key_file)
    return ctx


def load_tokenizers(s: GatewaySettings) -> dict[str, LocalTokenizer]:
    """``--tokenizer-dirs`` loaded (ConfigError naming the flag on a bad directory)."""
    out: dict[str, LocalTokenizer] = {}
    for model, directory in parse_tokenizer_dirs(s.tokenizer_dirs).items():
        try:
            out[model] = ModelTokenizer(directory)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"--tokenizer-dirs: model {model}: {exc}") from exc
    return out


class Gateway:
    """Everything one gateway process runs; ``start``/``stop`` for servers, tests and bench."""

    def __init__(self, settings: GatewaySettings,
                 policy_settings: Mapping[type[Any], Any] | None = None) -> None:
        self.s = settings
        self.registry = CollectorRegistry()
        self.runtime = RoutingRuntime(settings, policy_settings, self.registry)
        self.metrics = GatewayMetrics(self.registry)
        self.local = load_tokenizers(settings)
        self.session: aiohttp.ClientSession | None = None
        """For the catalog and engine tokenization (off the forwarding path)."""
        self.upstream: Upstream | None = None
        self.runner: web.AppRunner | None = None
        self.proxy: Proxy | None = None
        self.catalog: ModelCatalog | None = None
        self.port = 0

    async def start(self) -> int:
        """Start the registry link, the catalog and the HTTP server; returns the bound port."""
        s = self.s
        core = self.runtime.core
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ssl=upstream_ssl(s),
                                         keepalive_timeout=30.0)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             skip_auto_headers=("User-Agent",))
        scheme = "https" if s.upstream_tls else "http"
        self.catalog = ModelCatalog(core.known_nodes, self.session,
                                    refresh_s=s.models_refresh_s, scheme=scheme)
        engine = EngineTokenizer(self.session, scheme=scheme) if s.engine_tokenize else None
        tokens = PromptTokens(self.local, engine, TokenCache(s.tokenize_cache_entries))
        ctx = upstream_ssl(s)
        self.upstream = Upstream(s.connect_timeout_s, s.read_timeout_s,
                                 ctx if isinstance(ctx, ssl.SSLContext) else None)
        self.proxy = Proxy(core, self.catalog, tokens, self.upstream, s, self.metrics)
        self.metrics.bind_healthy(core.healthy_node_count)
        await self.runtime.start()
        self.catalog.start()
        self.runner = web.AppRunner(make_app(self.proxy, self.registry), access_log=None,
                                    handler_cancellation=True,
                                    shutdown_timeout=s.drain_timeout_s)
        await self.runner.setup()
        host, port = parse_hostport(s.listen, "listen")
        site = web.TCPSite(self.runner, host, port, ssl_context=server_ssl(s),
                           reuse_port=False)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return self.port

    async def stop(self) -> None:
        """Drain HTTP, stop the catalog, the registry link and the upstream session; each
        step also when an earlier one failed or the caller was cancelled in it (the first
        error is raised after the last step)."""
        await run_each(self.runner.cleanup if self.runner is not None else None,
                       self.catalog.stop if self.catalog is not None else None,
                       self.runtime.stop,
                       self.session.close if self.session is not None else None,
                       self.upstream.close if self.upstream is not None else None)


async def serve(settings: GatewaySettings,
                policy_settings: Mapping[type[Any], Any] | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain and return 0. The metrics server
    stops also when the gateway's own stop failed or was cancelled."""
    s = settings
    gw = Gateway(s, policy_settings)
    mhost, mport = parse_hostport(s.metrics_listen, "metrics_listen")
    metrics_server = MetricsServer(gw.registry, mhost, mport)
    stop = stop_on_signals(stop)
    try:
        port = await gw.start()
        bound_metrics = metrics_server.start()
        write_ready_file(s.ready_file, {"http_port": port, "metrics_port": bound_metrics,
                                        "pid": os.getpid()})
        log.info("gateway serving OpenAI API on port %d (metrics %d); settings %s", port,
                 bound_metrics, describe(s))
        await stop.wait()
        log.info("draining (up to %.1f s)", s.drain_timeout_s)
    finally:
        await run_each(gw.stop, metrics_server.stop)
    log.info("gateway stopped")
    return 0


def run(settings: GatewaySettings, policy_settings: Mapping[type[Any], Any] | None = None,
        ) -> int:
    """Run :func:`serve` on uvloop when ``--uvloop`` and it is installed."""
    if settings.uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop not installed; using the default asyncio loop")
        else:
            return int(uvloop.run(serve(settings, policy_settings)))
    return asyncio.run(serve(settings, policy_settings))
