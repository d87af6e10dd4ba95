"""The picker's own Prometheus metrics (``kvroute_epp_*``); the routing core exports its
``kvroute_router_*`` metrics on the same registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0)
BYTES_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20)


class EppMetrics:
    """Every metric of the ext_proc front (names ``kvroute_epp_*``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kvroute_epp_requests_total", "Requests seen by the picker, by outcome: routed "
            "(the core decided), passthrough (not an inference path: any healthy endpoint), "
            "rejected (answered with an immediate response), error (picker bug, 500)",
            ["outcome"], registry=registry)
        self.immediate = Counter(
            "kvroute_epp_immediate_responses_total",
            "Immediate responses sent instead of routing, by HTTP status", ["status"],
            registry=registry)
        self.decide_latency = Histogram(
            "kvroute_epp_decide_seconds", "From the request's last body byte reaching the "
            "picker to its answer (parse, decide, build the response)",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.body_bytes = Histogram(
            "kvroute_epp_request_body_bytes", "Request body size", buckets=BYTES_BUCKETS,
            registry=registry)
        self.body_messages = Histogram(
            "kvroute_epp_request_body_messages", "ext_proc messages one request body came in",
            buckets=(1, 2, 4, 8, 16, 64, 256, 1024), registry=registry)
        self.active = Gauge(
            "kvroute_epp_streams_active", "ext_proc streams open now (one per HTTP request)",
            registry=registry)
        self.completes = Counter(
            "kvroute_epp_completes_total", "Routed requests released in the core, by result: "
            "ok (response ended, status < 500), failed (5xx or the stream broke)", ["result"],
            registry=registry)
        self.served_elsewhere = Counter(
            "kvroute_epp_served_elsewhere_total", "Responses whose served endpoint (reported "
            "by the data plane) differs from the picker's first choice (fallback or retry)",
            registry=registry)
        self.served_missing = Counter(
            "kvroute_epp_served_unreported_total", "Routed responses without "
            "x-gateway-destination-endpoint-served (data plane not configured to report it)",
            registry=registry)
        self.cached_tokens = Counter(
            "kvroute_epp_reported_cached_tokens_total",
            "Sum of usage.prompt_tokens_details.cached_tokens read from engine responses",
            registry=registry)
