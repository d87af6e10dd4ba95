"""Assemble a routing core from settings: the one place every front end builds it.

:class:`RoutingRuntime` wires the registry link (index mirror or lookup stream), the load
tracker, the policies, the tokenizer and the metrics into a :class:`RouterCore`, and starts and
stops the link. ``kvroute serve router``, the OpenAI gateway and the Envoy endpoint picker each
own one runtime and call ``runtime.core`` in-process.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from kvroute.aio import run_each
from kvroute.errors import ConfigError
from router_service.core import RouterCore
from router_service.disagg import DisaggSettings
from router_service.load import LoadTracker
from router_service.metrics import RouterMetrics
from router_service.mirror_source import MirrorSource
from router_service.placement import PlacementSource
from router_service.policies.factory import PolicySet
from router_service.policies.kv_aware import KvAwareSettings
from router_service.route_share import SharedView
from router_service.settings import RouterSettings
from router_service.share_link import ShareLink
from router_service.stream_source import StreamSource
from router_service.tokenizer import load_tokenizer


def build_source(s: RouterSettings, metrics: RouterMetrics | None) -> PlacementSource:
    """The registry link chosen by ``--registry-mode``."""
    if s.registry_mode == "mirror":
        lag = metrics.replica_event_lag.observe if metrics is not None else None
        return MirrorSource(s.registry, s.client_tls, retry_max_s=s.registry_retry_max_s,
                            max_staleness_s=s.mirror_max_staleness_s, on_event_lag=lag)
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
    return RouterCore(s, policies, build_source(s, metrics), tracker, tokenizer, metrics,
                      disagg=policy_settings.get(DisaggSettings))



def attach_share_link(s: RouterSettings, core: RouterCore,
                      metrics: RouterMetrics | None) -> ShareLink:
    """Give ``core`` a shared view fed by a RouteShare link to the registry (issue 19)."""
    link = ShareLink(s.registry, s.client_tls, retry_max_s=s.registry_retry_max_s)
    replica = s.router_replica_id or f"{socket.gethostname()}:{os.getpid()}"
    core.share = SharedView(replica, link.send, time.time,
                            inflight_timeout_s=s.inflight_timeout_s,
                            max_blocks=s.share_max_blocks, timeout_s=s.share_timeout_s,
                            max_tracked=s.max_tracked_requests,
                            burst_window_s=s.share_burst_window_s,
                            burst_coincidence=s.share_burst_coincidence,
                            burst_stagger_s=s.share_burst_stagger_s)
    link.attach(core, metrics)
    if metrics is not None:
        view = core.share
        metrics.shared_view_connected.set_function(lambda: 1.0 if view.live() else 0.0)
        metrics.remote_inflight.set_function(lambda: float(view.remote.total))
        metrics.shared_view_peers.set_function(lambda: float(view.peers()))
        metrics.shared_view_coincidence.set_function(lambda: view.coincidence)
    return link


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
        self.share_link: ShareLink | None = None
        if settings.share_routes:
            self.share_link = attach_share_link(settings, core, self.metrics)

    @property
    def replica_id(self) -> str:
        """This replica's id in the shared view ("" without --share-routes)."""
        return self.core.share.replica_id if self.core.share is not None else ""

    async def start(self) -> None:
        """Start following the registry (returns without waiting for it).

        Also moves every object made so far (modules, settings, policies) out of the garbage
        collector's reach (``gc.freeze``): a full collection then no longer walks them, which
        was most of the router's p99 on large fleets (``kvroute bench decide --no-gc``).
        """
        gc.freeze()
        await self.core.source.start()
        if self.share_link is not None:
            await self.share_link.start()

    async def stop(self) -> None:
        """Stop the shared-view link and the registry link (the second also when the first
        failed or the caller was cancelled in it)."""
        await run_each(self.share_link.stop if self.share_link is not None else None,
                       self.core.source.stop)
