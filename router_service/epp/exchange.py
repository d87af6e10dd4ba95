"""One HTTP request and its response as the picker sees them over one ext_proc stream.

Envoy opens one ``Process`` stream per HTTP request and sends, in order, the request headers,
the request body (one message when buffered, many when streamed), maybe trailers, then the same
for the response. :class:`Exchange` turns each message into the responses Envoy waits for:

- request path: accumulate the body (any number of messages, up to ``--max-body-bytes``), then
  decide with the routing core and answer with the ``x-gateway-destination-endpoint`` header
  (``raw_value``) plus the same value in dynamic metadata. ``BUFFERED`` mode answers on the body
  message; ``FULL_DUPLEX_STREAMED`` holds the headers until the body ended, then answers the
  headers and hands the body back (Envoy forwards only what the picker returns in that mode).
  ``STREAMED`` is refused with a 500 naming the fix: Envoy forwards the headers before the
  picker has seen the body, so it cannot route on the prompt.
- response path: note the served endpoint (``envoy.lb`` / ``x-gateway-destination-endpoint-
  served`` in the metadata context, or the response header of that name), scan the body for
  the engine's ``cached_tokens``, and release the request in the core when the response ends.
  A stream that breaks first releases it as failed.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Iterator

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from kvroute.errors import KvrouteError, ResourceExhausted, Unavailable
from router_service.core import RouterCore
from router_service.domain import RouteDecision
from router_service.epp import openai_body, protocol
from router_service.epp.endpoints import endpoint_of, join
from router_service.epp.metrics import EppMetrics
from router_service.epp.settings import EppSettings
from router_service.epp.usage import UsageScanner
from router_service.prompt_tokens import PromptTokens

log = logging.getLogger(__name__)

Responses = list[ep.ProcessingResponse]

_STATUS_OF_CODE = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
                   "UNAVAILABLE": 503, "FAILED_PRECONDITION": 503, "DEADLINE_EXCEEDED": 504}


class Inflight:
    """Routed requests of this picker whose response has not finished (for load shedding)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def full(self) -> bool:
        """True when a new request must be shed."""
        return 0 < self.limit <= self.count


class Exchange:
    """State of one request/response over one ext_proc stream."""

    _ids = itertools.count(1)

    def __init__(self, core: RouterCore, settings: EppSettings, metrics: EppMetrics,
                 passthrough: Iterator[str], inflight: Inflight,
                 tokens: PromptTokens | None = None) -> None:
        self.core = core
        self.tokens = tokens
        self.inflight = inflight
        self.settings = settings
        self.metrics = metrics
        self._passthrough = passthrough
        self.request_mode = protocol.BUFFERED
        self.response_mode = protocol.NONE
        self.headers: dict[str, str] = {}
        self.subset: list[str] | None = None
        self.body = bytearray()
        self.body_messages = 0
        self.request_id = ""
        self.decision: RouteDecision | None = None
        self.endpoint = ""
        self.routed = False
        self.answered = False
        self.completed = False
        self.status = 0
        self.served = ""
        self.usage = UsageScanner(settings.max_usage_scan_bytes)

    # -- dispatch -------------------------------------------------------------------------
    async def handle(self, msg: ep.ProcessingRequest) -> Responses:
        """The responses to one message from Envoy (possibly none yet)."""
        if msg.HasField("protocol_config"):
            self.request_mode = msg.protocol_config.request_body_mode
            self.response_mode = msg.protocol_config.response_body_mode
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            return await self._request_headers(msg)
        if kind == "request_body":
            return await self._request_body(msg.request_body)
        if kind == "request_trailers":
            return await self._request_trailers()
        if kind == "response_headers":
            return self._response_headers(msg)
        if kind == "response_body":
            return self._response_body(msg.response_body)
        if kind == "response_trailers":
            self.finish(success=self.status < 500)
            return [protocol.continue_trailers(request=False)]
        return []

    # -- request path ---------------------------------------------------------------------
    async def _request_headers(self, msg: ep.ProcessingRequest) -> Responses:
        self.headers = protocol.header_map(msg.request_headers.headers)
        hint = protocol.filter_value(msg, self.settings.subset_namespace, protocol.SUBSET_KEY)
        if hint is not None:
            self.subset = protocol.endpoint_list(hint)
        xrid = self.headers.get("x-request-id", "")[:200] or uuid.uuid4().hex
        self.request_id = f"{xrid}#{next(self._ids)}"
        if msg.request_headers.end_of_stream or self.request_mode == protocol.NONE:
            out = await self._answer()
            return [self._on_headers(out)] if isinstance(out, ep.HeaderMutation) else [out]
        if self.request_mode == protocol.STREAMED:
            return [self._reject(500, "the picker cannot route in STREAMED request body mode: "
                                      "Envoy forwards the headers before the body reaches it. "
                                      "Configure request_body_mode FULL_DUPLEX_STREAMED "
                                      "(or BUFFERED)", "epp_streamed_mode_unsupported")]
        if self.request_mode == protocol.FULL_DUPLEX_STREAMED:
            return []  # hold the headers until the body has been seen
        return [protocol.continue_headers(request=True)]

    async def _request_body(self, b: ep.HttpBody) -> Responses:
        if self.answered:
            if self.request_mode == protocol.FULL_DUPLEX_STREAMED:
                return protocol.streamed_pieces(True, b.body, b.end_of_stream)
            return [protocol.continue_body(request=True)]
        self.body_messages += 1
        if len(self.body) + len(b.body) > self.settings.max_body_bytes:
            return [self._reject(413, f"request body is larger than the picker's limit of "
                                      f"{self.settings.max_body_bytes} bytes (--max-body-bytes)",
                                 "epp_body_too_large")]
        self.body += b.body
        if self.request_mode == protocol.FULL_DUPLEX_STREAMED:
            if not b.end_of_stream:
                return []
            out = await self._answer()
            if not isinstance(out, ep.HeaderMutation):
                return [out]
            return [self._on_headers(out), *protocol.streamed_pieces(True, bytes(self.body),
                                                                      True)]
        if self.request_mode == protocol.BUFFERED_PARTIAL and not b.end_of_stream:
            return [self._reject(413, "request body is larger than Envoy's buffer "
                                      "(BUFFERED_PARTIAL sent only its first part); raise the "
                                      "listener's per_connection_buffer_limit_bytes or use "
                                      "FULL_DUPLEX_STREAMED", "epp_body_truncated")]
        out = await self._answer()
        if not isinstance(out, ep.HeaderMutation):
            return [out]
        resp = protocol.continue_body(request=True, mutation=out)
        self._add_metadata(resp)
        return [resp]

    async def _request_trailers(self) -> Responses:
        if self.answered or self.request_mode != protocol.FULL_DUPLEX_STREAMED:
            return [protocol.continue_trailers(request=True)]
        out = await self._answer()
        if not isinstance(out, ep.HeaderMutation):
            return [out]
        return [self._on_headers(out),
                *protocol.streamed_pieces(True, bytes(self.body), False),
                protocol.continue_trailers(request=True)]

    def _on_headers(self, mutation: ep.HeaderMutation) -> ep.ProcessingResponse:
        resp = protocol.continue_headers(request=True, mutation=mutation)
        self._add_metadata(resp)
        return resp

    def _add_metadata(self, resp: ep.ProcessingResponse) -> None:
        if self.endpoint:
            resp.dynamic_metadata.CopyFrom(protocol.destination_metadata(
                self.settings.destination_namespace, self.endpoint))

    def _reject(self, status: int, message: str, details: str) -> ep.ProcessingResponse:
        self.answered = True
        self.metrics.requests.labels("rejected" if status < 500 or status == 503
                                     else "error").inc()
        self.metrics.immediate.labels(str(status)).inc()
        log.info("request %s answered %d: %s", self.request_id, status, message)
        return protocol.immediate(status, message, details,
                                  self.settings.immediate_response_details)

    async def _answer(self) -> ep.HeaderMutation | ep.ProcessingResponse:
        """Decide; the header mutation to send, or an immediate response."""
        t0 = time.perf_counter()
        self.answered = True
        self.metrics.body_bytes.observe(len(self.body))
        self.metrics.body_messages.observe(self.body_messages)
        try:
            endpoints = await self._pick()
        except openai_body.BodyError as exc:
            return self._reject(exc.status, exc.message, "epp_bad_request")
        except KvrouteError as exc:
            status = _STATUS_OF_CODE.get(exc.code.name, 500)
            return self._reject(status, exc.message, f"epp_{exc.code.name.lower()}")
        except Exception as exc:  # a picker bug must not take the request's stream down
            log.exception("request %s: picking failed", self.request_id)
            return self._reject(500, f"endpoint picker internal error: {type(exc).__name__}",
                                "epp_internal_error")
        self.endpoint = join(endpoints)
        values = {protocol.DESTINATION_HEADER: self.endpoint}
        self.metrics.decide_latency.observe(time.perf_counter() - t0)
        return protocol.set_headers(values)

    async def _pick(self) -> list[str]:
        """Endpoints in order: the core's decision (+ fallbacks), or any healthy one."""
        endpoint = openai_body.endpoint_of(self.headers.get(":path", ""))
        allowed = self._allowed()
        if endpoint is None or self.headers.get(":method", "POST") != "POST":
            self.metrics.requests.labels("passthrough").inc()
            return [self._any_endpoint(allowed)]
        s = self.settings
        ctx = openai_body.RouteContext(
            request_id=self.request_id,
            session_id=self.headers.get(s.session_header) if s.session_header else None,
            policy=self.headers.get(s.policy_header) if s.policy_header else None,
            allowed=allowed)
        req = await openai_body.build(endpoint, bytes(self.body), ctx, self.tokens,
                                      self._engines_of)
        if self.inflight.full():
            raise ResourceExhausted(f"load shed: {self.inflight.count} requests in flight "
                                    f"through this picker (--max-inflight-requests "
                                    f"{self.inflight.limit}); retry later")
        decision = await self.core.decide(req)
        self.decision = decision
        self.routed = True
        self.inflight.count += 1
        self.metrics.requests.labels("routed").inc()
        fallbacks = [endpoint_of(a) for a in decision.fallback_addresses]
        return [endpoint_of(decision.address), *fallbacks[: s.fallback_endpoints]]

    def _engines_of(self, model: str) -> list[str]:
        """Addresses of healthy engines of ``model`` (asked to tokenize text prompts)."""
        return [n.address for n in self.core.known_nodes()
                if n.healthy and (not model or n.model == model)]

    def _allowed(self) -> frozenset[str] | None:
        """Node ids (and the raw endpoints) of the subset hint; None = no hint."""
        if self.subset is None:
            return None
        wanted = set(self.subset)
        if not wanted:
            raise Unavailable("the data plane's subset hint lists no endpoint")
        ids = {n.node_id for n in self.core.known_nodes() if endpoint_of(n.address) in wanted}
        if not ids:
            raise Unavailable(f"none of the {len(wanted)} endpoints of the subset hint "
                              f"({', '.join(sorted(wanted)[:4])}) is a node kvroute knows")
        return frozenset(ids | wanted)

    def _any_endpoint(self, allowed: frozenset[str] | None) -> str:
        nodes = [n for n in self.core.known_nodes() if n.healthy
                 and (allowed is None or n.node_id in allowed)]
        if not nodes:
            raise Unavailable("no healthy node is known; retry later")
        nodes.sort(key=lambda n: n.node_id)
        pick = int(next(self._passthrough)) % len(nodes)
        return endpoint_of(nodes[pick].address)

    # -- response path --------------------------------------------------------------------
    def _response_headers(self, msg: ep.ProcessingRequest) -> Responses:
        headers = protocol.header_map(msg.response_headers.headers)
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        served = protocol.filter_value(msg, self.settings.destination_namespace,
                                       protocol.SERVED_KEY) or headers.get(protocol.SERVED_KEY)
        self.served = ",".join(protocol.endpoint_list(served))
        mutation = None
        d = self.decision
        if self.settings.expose_decision and d is not None:
            mutation = protocol.set_headers({
                protocol.NODE_HEADER: d.node_id, protocol.ENDPOINT_HEADER: self.endpoint,
                protocol.EXPECTED_CACHED_HEADER: str(d.expected_cached_tokens),
                protocol.SERVED_ECHO_HEADER: self.served or "unreported"})
        if msg.response_headers.end_of_stream or self.response_mode == protocol.NONE:
            self.finish(success=self.status < 500)
        return [protocol.continue_headers(request=False, mutation=mutation)]

    def _response_body(self, b: ep.HttpBody) -> Responses:
        out = (protocol.streamed_pieces(False, b.body, b.end_of_stream)
               if self.response_mode == protocol.FULL_DUPLEX_STREAMED
               else [protocol.continue_body(request=False)])
        if self.routed and not self.completed:
            self.usage.feed(b.body)
        if b.end_of_stream:
            self.finish(success=self.status < 500)
        return out

    def finish(self, success: bool) -> None:
        """Release the request in the core once (also called when the stream breaks)."""
        if self.completed or not self.routed or self.decision is None:
            return
        self.completed = True
        self.inflight.count -= 1
        cached = self.usage.cached_tokens
        if self.served:
            first = self.served.split(",")[0]
            if first != self.endpoint.split(",")[0]:
                # the data plane retried past our first choice: it failed to serve
                self.metrics.served_elsewhere.inc()
                self.core.mark_suspect(self.decision.node_id, f"the data plane served request "
                                       f"{self.request_id} from {first} instead")
        elif self.status:
            self.metrics.served_missing.inc()
        if cached is not None:
            self.metrics.cached_tokens.inc(cached)
        self.metrics.completes.labels("ok" if success else "failed").inc()
        self.core.complete(self.request_id, success=success, cached_tokens=cached)
