"""The router's Prometheus metrics, on a registry owned by one server (no global registry)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0)
#: The shared view's staleness is a few ms with a tail of tens: finer bounds there, so its
#: p50 / p99 are not interpolated across (2, 5] and (25, 50] ms.
STALENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                     0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class RouterMetrics:
    """Every metric the router exports (names ``kvroute_router_*``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "kvroute_router_decisions_total", "Route decisions by policy and outcome "
            "(ok, degraded, invalid_argument, not_found, unavailable, failed_precondition, "
            "internal)", ["policy", "outcome"], registry=registry)
        self.predicted_cached_tokens = Counter(
            "kvroute_router_predicted_cached_tokens_total",
            "Sum of expected_cached_tokens over decisions (the registry's belief)",
            registry=registry)
        self.predicted_offloaded_tokens = Counter(
            "kvroute_router_predicted_offloaded_tokens_total",
            "Sum of expected_offloaded_tokens over decisions: prompt tokens the chosen node "
            "holds on an offloading medium (CPU/disk) beyond its GPU prefix",
            registry=registry)
        self.reported_cached_tokens = Counter(
            "kvroute_router_reported_cached_tokens_total",
            "Sum of cached_tokens the engines reported through Complete", registry=registry)
        self.prompt_tokens = Counter(
            "kvroute_router_prompt_tokens_total", "Sum of prompt tokens over decisions",
            registry=registry)
        self.degraded = Counter(
            "kvroute_router_degraded_decisions_total",
            "Decisions made with least_loaded on last known nodes because the registry was "
            "unreachable", registry=registry)
        self.route_latency = Histogram(
            "kvroute_router_route_latency_seconds",
            "Time to make one routing decision inside the router (validation, hashing, lookup, "
            "policy)", buckets=LATENCY_BUCKETS, registry=registry)
        self.lookup_latency = Histogram(
            "kvroute_router_lookup_latency_seconds",
            "Time of one placement lookup (local index mirror or registry stream)", ["mode"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.inflight_expired = Counter(
            "kvroute_router_inflight_expired_total",
            "Requests released by the in-flight timeout instead of Complete", registry=registry)
        self.completes = Counter(
            "kvroute_router_completes_total", "Complete calls by result (released, unknown)",
            ["result"], registry=registry)
        self.replica_event_lag = Histogram(
            "kvroute_router_replica_event_lag_seconds",
            "Delay between the registry sending a placement event and the index mirror applying it",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.staleness = Gauge(
            "kvroute_router_registry_staleness_seconds",
            "Age of the newest registry data the router holds (0 while the link is live)",
            registry=registry)
        self.connected = Gauge(
            "kvroute_router_registry_connected", "1 while the link to the registry is up",
            registry=registry)
        self.nodes_known = Gauge(
            "kvroute_router_nodes_known", "Nodes known from the registry", registry=registry)
        self.inflight = Gauge(
            "kvroute_router_inflight_requests", "Requests routed and not yet completed",
            registry=registry)
        self.shared_view_staleness = Histogram(
            "kvroute_router_shared_view_staleness_seconds",
            "Age of another replica's routing delta when this replica applied it (sender's "
            "timestamp to now)", buckets=STALENESS_BUCKETS, registry=registry)
        self.shared_view_published = Counter(
            "kvroute_router_shared_view_deltas_published_total",
            "Routing deltas (decisions and completions) this replica published to the others; "
            "each other replica's staleness histogram count is what it applied of them",
            registry=registry)
        self.shared_view_connected = Gauge(
            "kvroute_router_shared_view_connected",
            "1 while this replica holds the shared view of the other replicas' load "
            "(0: deciding on its own counts)", registry=registry)
        self.own_view_decisions = Counter(
            "kvroute_router_own_view_decisions_total",
            "Decisions made on this replica's own counts because the shared view was lost",
            registry=registry)
        self.burst_decisions = Counter(
            "kvroute_router_replica_burst_decisions_total",
            "Decisions made in a burst next to other live replicas (kv_aware takes this "
            "replica's slot of their plan instead of the plain best node)", registry=registry)
        self.staggered_decisions = Counter(
            "kvroute_router_replica_staggered_decisions_total",
            "Decisions that waited their turn in a burst (--share-burst-stagger-s: rank x the "
            "stagger) so the lower-ranked replicas' decisions were in view", registry=registry)
        self.shared_view_peers = Gauge(
            "kvroute_router_shared_view_peers",
            "Other replicas this replica heard routing within 30 s (shared view). Below the "
            "deployment's replicas - 1 while every replica routes: some replicas are not heard "
            "(their registry pod's relay to this one's is broken, or relay is off)",
            registry=registry)
        self.shared_view_coincidence = Gauge(
            "kvroute_router_shared_view_coincidence",
            "Share of the other replicas' recent decisions made within --share-burst-window-s "
            "of one of this replica's (at --share-burst-coincidence and above every decision "
            "takes its slot)", registry=registry)
        self.remote_inflight = Gauge(
            "kvroute_router_remote_inflight_requests",
            "Requests other router replicas routed and not yet completed (shared view)",
            registry=registry)
        self.prefill_rate = Gauge(
            "kvroute_router_node_prefill_tokens_per_second",
            "Prefill rate the router believes of each node (calibrated from the engine's "
            "metrics, or --kv-prefill-tokens-per-s until measured)", ["node"],
            registry=registry)
        self._ok: dict[str, Counter] = {}

    def decision_ok(self, policy: str, degraded: bool) -> None:
        """Count one successful decision (cached label children: this is the hot path)."""
        key = policy + ("/d" if degraded else "")
        child = self._ok.get(key)
        if child is None:
            child = self.decisions.labels(policy, "degraded" if degraded else "ok")
            self._ok[key] = child
        child.inc()

    def bind_gauges(self, staleness: Callable[[], float], connected: Callable[[], bool],
                    nodes_known: Callable[[], int], inflight: Callable[[], int]) -> None:
        """Gauges read at scrape time."""
        self.staleness.set_function(staleness)
        self.connected.set_function(lambda: 1.0 if connected() else 0.0)
        self.nodes_known.set_function(lambda: float(nodes_known()))
        self.inflight.set_function(lambda: float(inflight()))
