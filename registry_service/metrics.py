"""Prometheus metrics of one registry server (on its own CollectorRegistry)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RegistryMetrics:
    """Every metric the registry exports; names ``kvroute_registry_*``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.nodes = Gauge("kvroute_registry_nodes", "Nodes with a live lease", registry=r)
        self.index_entries = Gauge("kvroute_registry_index_entries",
                                   "(block, node) pairs in the index", registry=r)
        self.index_blocks = Gauge("kvroute_registry_index_blocks",
                                  "Distinct block hashes in the index", registry=r)
        self.index_bytes = Gauge("kvroute_registry_index_bytes",
                                 "Estimated memory of the block index", registry=r)
        self.heartbeats = Counter("kvroute_registry_heartbeats_total",
                                  "Heartbeats served, by result", ["result"], registry=r)
        self.block_events = Counter("kvroute_registry_block_events_total",
                                    "Block stored/removed events ingested from heartbeats",
                                    registry=r)
        self.resyncs = Counter("kvroute_registry_resyncs_total", "Resync streams completed",
                               registry=r)
        self.resync_requests = Counter(
            "kvroute_registry_resync_requests_total",
            "Heartbeats answered with resync_required, by reason", ["reason"], registry=r)
        self.lease_expiries = Counter(
            "kvroute_registry_lease_expiries_total",
            "Nodes removed because their lease expired (seen through the store; a node "
            "deregistered through another replica also counts)", registry=r)
        self.lookups = Counter("kvroute_registry_lookups_total", "Lookups answered",
                               registry=r)
        self.lookup_seconds = Histogram(
            "kvroute_registry_lookup_seconds", "Time to answer one Lookup (in the server)",
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1), registry=r)
        self.store_seconds = Histogram(
            "kvroute_registry_store_op_seconds", "Placement store (etcd) operation latency",
            ["op"], buckets=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10),
            registry=r)
        self.store_errors = Counter("kvroute_registry_store_errors_total",
                                    "Placement store (etcd) operations that failed",
                                    ["op"], registry=r)
        self.store_relists = Counter(
            "kvroute_registry_store_relists_total",
            "Times the replica re-listed the store (start, compaction, watch failure)",
            registry=r)

        self.refused = Counter(
            "kvroute_registry_refused_total",
            "Calls refused by the security layer, by method and reason (unauthenticated, "
            "permission_denied, write_token, rate_limited, node_capacity, index_full)",
            ["method", "reason"], registry=r)

    def track_index(self, entries: Callable[[], float], blocks: Callable[[], float],
                    nbytes: Callable[[], float], nodes: Callable[[], float]) -> None:
        """Compute the index gauges at scrape time."""
        self.index_entries.set_function(entries)
        self.index_blocks.set_function(blocks)
        self.index_bytes.set_function(nbytes)
        self.nodes.set_function(nodes)
