"""The gateway's aiohttp application: OpenAI routes, /v1/models, /health, /live, /metrics.

Every error a client can get, including unknown paths and wrong methods, is an OpenAI-shaped
JSON body; no handler exception reaches aiohttp's default error page.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from router_service.gateway.proxy import Proxy, error_response
from router_service.openai_request import OpenAIError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OpenAIError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(OpenAIError(exc.status, f"{request.method} {request.path}: "
                                          f"{exc.reason}"))
    except Exception as exc:  # never let a handler bug take the server down
        log.exception("internal error serving %s %s", request.method, request.path)
        return error_response(OpenAIError(500, f"internal error: {type(exc).__name__}"))


def make_app(proxy: Proxy, registry: CollectorRegistry) -> web.Application:
    """The application; ``client_max_size`` is the body limit (larger bodies -> 413)."""
    app = web.Application(middlewares=[_errors], client_max_size=proxy.s.max_body_bytes)
    core, catalog = proxy.core, proxy.catalog

    async def completions(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, "completions")

    async def chat(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, "chat")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": catalog.listing()})

    async def health(request: web.Request) -> web.Response:
        n = core.healthy_node_count()
        body = {"status": "ok" if n else "no healthy node", "healthy_nodes": n}
        return web.json_response(body, status=200 if n else 503)

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat),
        web.get("/v1/models", models),
        web.get("/health", health),
        web.get("/live", live),
        web.get("/metrics", metrics),
    ])
    return app
