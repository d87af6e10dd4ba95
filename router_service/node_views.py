"""The candidates a policy sees: each node's reusable match (GPU, then offloaded) and load.

:func:`node_views` turns the placement's (node, matched blocks) pairs and offloaded blocks into
:class:`~router_service.policies.base.NodeView` s: the match counted as the node's engine reuses
it (:meth:`~router_service.placement.NodeState.reusable_tiers`), this router's in-flight count
plus other replicas' (shared view), the queued-prefill estimate, and whether the node's index
is complete. A node's newly calibrated prefill rate is reported through ``on_rate``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from router_service.load import LoadTracker
from router_service.placement import NodeState
from router_service.policies.base import NodeView, RequestView
from router_service.route_share import RemoteLoad


def node_views(pairs: Sequence[tuple[NodeState, int]], view: RequestView,
               offloaded: Mapping[str, int], tracker: LoadTracker, remote: RemoteLoad | None,
               on_rate: Callable[[str, float], None]) -> list[NodeView]:
    """One NodeView per (node, matched device blocks) pair (module docstring)."""
    bs, prompt = view.block_size, view.prompt_tokens
    views = []
    for n, matched in pairs:
        nid = n.node_id
        if n.prefill_tokens_per_s != tracker.rate(nid) and n.prefill_tokens_per_s:
            on_rate(nid, n.prefill_tokens_per_s)
        dev, low = n.reusable_tiers(matched, offloaded.get(nid, 0), bs, prompt)
        views.append(NodeView(
            nid, n.address, dev,
            tracker.inflight(nid) + (remote.inflight(nid) if remote is not None else 0),
            n.queue_depth, n.running, n.used_blocks, n.capacity_blocks, n.eviction_rate,
            tracker.pending_prefill(nid), n.healthy, n.prefill_tokens_per_s, low,
            n.index_complete, n.role))
    return views


def offloaded_of(views: Sequence[NodeView], node_id: str) -> int:
    """Offloaded blocks of the chosen node's view (0 when it has none)."""
    return next((v.offloaded_blocks for v in views if v.node_id == node_id), 0)
