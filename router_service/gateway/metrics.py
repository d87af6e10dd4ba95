"""The gateway's Prometheus metrics (``kvroute_gateway_*``), next to the core's router metrics
on the same registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_FAST = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """Requests, upstream attempts, the gateway's own latency, tokenization sources."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kvroute_gateway_requests_total",
            "Requests answered, by endpoint and HTTP status class (2xx, 4xx, 5xx) or "
            "'disconnect' when the client went away first", ["endpoint", "status"],
            registry=registry)
        self.upstream_errors = Counter(
            "kvroute_gateway_upstream_errors_total",
            "Failed engine attempts: connect (no connection), status (5xx before the first "
            "byte), midstream (failed after the first byte)", ["kind"], registry=registry)
        self.retries = Counter(
            "kvroute_gateway_retries_total",
            "Requests sent to another node after a failure before the first byte",
            registry=registry)
        self.overhead = Histogram(
            "kvroute_gateway_overhead_seconds",
            "Gateway time before the engine request is sent: read and parse the body, "
            "tokenize, decide", buckets=_FAST, registry=registry)
        self.first_byte = Histogram(
            "kvroute_gateway_time_to_first_byte_seconds",
            "From receiving the request to the engine's first response byte",
            buckets=_SLOW, registry=registry)
        self.duration = Histogram(
            "kvroute_gateway_request_duration_seconds", "Whole request, as the gateway saw it",
            buckets=_SLOW, registry=registry)
        self.tokenize = Counter(
            "kvroute_gateway_prompt_tokens_source_total",
            "Where the prompt ids for routing came from: ids (sent by the client), local "
            "(tokenizer files), cache (an earlier engine answer), engine (POST /tokenize)",
            ["source"], registry=registry)
        self.rejected = Counter(
            "kvroute_gateway_rejected_total",
            "Requests refused before routing: too_large (413), overloaded (429)",
            ["reason"], registry=registry)
        self.inflight = Gauge(
            "kvroute_gateway_inflight_requests", "Requests being served now", registry=registry)
        self.cached_tokens = Counter(
            "kvroute_gateway_engine_cached_tokens_total",
            "usage.prompt_tokens_details.cached_tokens the engines reported", registry=registry)
        self.predicted_tokens = Counter(
            "kvroute_gateway_predicted_cached_tokens_total",
            "Cached tokens the router predicted for requests whose engine reported usage",
            registry=registry)
        self._healthy = Gauge(
            "kvroute_gateway_healthy_nodes", "Healthy nodes the gateway can route to",
            registry=registry)

    def bind_healthy(self, count: Callable[[], int]) -> None:
        """Read the healthy node count at scrape time."""
        self._healthy.set_function(lambda: float(count()))
