"""``envoy.service.ext_proc.v3.ExternalProcessor``: one Process stream per HTTP request."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from router_service.core import RouterCore
from router_service.epp import protocol
from router_service.epp.exchange import Exchange, Inflight
from router_service.epp.metrics import EppMetrics
from router_service.epp.settings import EppSettings
from router_service.prompt_tokens import PromptTokens

log = logging.getLogger(__name__)


class ExternalProcessorServicer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Runs an :class:`Exchange` per stream; never lets one request break the server."""

    def __init__(self, core: RouterCore, settings: EppSettings, metrics: EppMetrics,
                 tokens: PromptTokens | None = None) -> None:
        self.core = core
        self.tokens = tokens
        self.settings = settings
        self.metrics = metrics
        self._passthrough = (str(i) for i in itertools.count())
        self.inflight = Inflight(settings.max_inflight_requests)

    async def Process(self, request_iterator: AsyncIterator[ep.ProcessingRequest],
                      context: grpc.aio.ServicerContext[Any, Any],
                      ) -> AsyncIterator[ep.ProcessingResponse]:
        """Answer each message of one HTTP exchange; release the request when it ends."""
        ex = Exchange(self.core, self.settings, self.metrics, self._passthrough,
                      self.inflight, self.tokens)
        self.metrics.active.inc()
        ok = False
        try:
            async for msg in request_iterator:
                try:
                    out = await ex.handle(msg)
                except Exception:
                    log.exception("request %s: ext_proc message failed", ex.request_id)
                    if ex.answered:
                        raise  # response path: let Envoy apply its failure mode
                    out = [protocol.immediate(500, "endpoint picker internal error",
                                              "epp_internal_error")]
                for resp in out:
                    yield resp
            ok = True
        finally:
            self.metrics.active.dec()
            # a stream that ends before the response did (client gone, upstream reset) frees
            # the request as failed; one whose response ended was released already
            ex.finish(success=ok and 0 < ex.status < 500)
