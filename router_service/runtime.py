"""Assemble a routing core from settings: the one place every front end builds it.

:class:`RoutingRuntime` wires the registry link (index mirror or lookup stream), the load
tracker, the policies, the tokenizer and the metrics into a :class:`RouterCore`, and starts and
stops the link. ``kvroute serve router``, the OpenAI gateway and the Envoy endpoint picker each
own one runtime and call ``runtime.core`` in-process.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from kvroute.errors import ConfigError
from router_service.core import RouterCore
from router_service.load import LoadTracker
from router_service.metrics import RouterMetrics
from router_service.placement import PlacementSource
from router_service.policies.kv_aware import KvAwareSettings
from router_service.policies.registry import PolicySet
from router_service.replica_source import ReplicaSource
from router_service.settings import RouterSettings
from router_service.stream_source import StreamSource
from router_service.tokenizer import load_tokenizer


def build_source(s: RouterSettings, metrics: RouterMetrics | None) -> PlacementSource:
    """The registry link chosen by ``--registry-mode``."""
    if s.registry_mode == "replica":
        lag = metrics.replica_event_lag.observe if metrics is not None else None
        return ReplicaSource(s.registry, s.client_tls, retry_max_s=s.registry_retry_max_s,
                             max_staleness_s=s.replica_max_staleness_s, on_event_lag=lag)
    return StreamSource(s.registry, s.client_tls, lookup_timeout_s=s.lookup_timeout_s,
                        call_timeout_s=s.registry_timeout_s, retry_max_s=s.registry_retry_max_s,
                        node_cache_ttl_s=s.node_cache_ttl_s)


def build_core(s: RouterSettings, policy_settings: Mapping[type[Any], Any],
               metrics: RouterMetrics | None) -> RouterCore:
    """Policies, load tracker, tokenizer and registry link wired into a RouterCore.

    The tracker's prefill drain rate is kv_aware's ``--kv-prefill-tokens-per-s`` (one number
    for "how fast an engine prefills").
    """
    kv = policy_settings.get(KvAwareSettings) or KvAwareSettings()
    tracker = LoadTracker(time.monotonic, s.inflight_timeout_s, kv.kv_prefill_tokens_per_s,
                          s.max_tracked_requests)
    policies = PolicySet(policy_settings)
    if policies.get(s.default_policy) is None:
        raise ConfigError(f"--default-policy: unknown policy {s.default_policy!r}; known: "
                          f"{', '.join(policies.names)}")
    try:
        tokenizer = load_tokenizer(s.tokenizer, s.tokenizer_file)
    except ValueError as exc:
        raise ConfigError(f"--tokenizer: {exc}") from exc
    return RouterCore(s, policies, build_source(s, metrics), tracker, tokenizer, metrics)



class RoutingRuntime:
    """A routing core with its registry link, metrics and lifecycle."""

    def __init__(self, settings: RouterSettings,
                 policy_settings: Mapping[type[Any], Any] | None,
                 registry: CollectorRegistry) -> None:
        self.settings = settings
        self.metrics = RouterMetrics(registry)
        self.core = build_core(settings, policy_settings or {}, self.metrics)
        core = self.core
        self.metrics.bind_gauges(core.source.staleness_s, lambda: core.source.connected,
                                 core.source.nodes_known, lambda: core.tracker.total_inflight)

    async def start(self) -> None:
        """Start following the registry (returns without waiting for it).

        Also moves every object made so far (modules, settings, policies) out of the garbage
        collector's reach (``gc.freeze``): a full collection then no longer walks them, which
        was most of the router's p99 on large fleets (``kvroute bench decide --no-gc``).
        """
        gc.freeze()
        await self.core.source.start()

    async def stop(self) -> None:
        """Stop the registry link."""
        await self.core.source.stop()
