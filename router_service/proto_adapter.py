"""The gRPC Router API's messages <-> the routing core's plain types (nothing else).

The servicer calls :func:`to_route_request`, :meth:`RouterCore.decide` and
:func:`to_route_response`; Complete and Stats likewise. No routing logic lives here.
"""

from __future__ import annotations

import math

from kvroute.errors import InvalidArgument
from kvroute.v1 import router_pb2
from router_service.core import RouterCore
from router_service.domain import RouteDecision, RouteRequest

_MAX_CANDIDATES = 16


def to_route_request(req: router_pb2.RouteRequest) -> RouteRequest:
    """A protobuf RouteRequest as the core's request (optional fields to None)."""
    return RouteRequest(
        request_id=req.request_id, model=req.model,
        token_ids=req.token_ids if req.token_ids else None,
        prompt=req.prompt or None,
        block_hashes=req.block_hashes if req.block_hashes else None,
        num_prompt_tokens=req.num_prompt_tokens,
        session_id=req.session_id if req.HasField("session_id") and req.session_id else None,
        policy=req.policy if req.HasField("policy") and req.policy else None,
        lora_name=req.lora_name or None, cache_salt=req.cache_salt or None,
        max_output_tokens=req.max_output_tokens,
        deadline_s=_deadline(req) if req.HasField("deadline_s") else None,
        disaggregated=req.disaggregated if req.HasField("disaggregated") else None,
        decode_policy=req.decode_policy if req.HasField("decode_policy") and req.decode_policy
        else None)


def _deadline(req: router_pb2.RouteRequest) -> float:
    d = req.deadline_s
    if not math.isfinite(d) or d < 0:
        raise InvalidArgument(f"deadline_s: must be a finite number of seconds >= 0 (got {d})")
    return d


def to_route_response(d: RouteDecision) -> router_pb2.RouteResponse:
    """The core's decision as a protobuf RouteResponse."""
    return router_pb2.RouteResponse(
        request_id=d.request_id, node_id=d.node_id, address=d.address, policy=d.policy,
        matched_blocks=d.matched_blocks, expected_cached_tokens=d.expected_cached_tokens,
        reason=d.reason, degraded=d.degraded, prompt_tokens=d.prompt_tokens,
        block_size=d.block_size,
        candidates=[router_pb2.Candidate(node_id=c.node_id, score=c.score,
                                         matched_blocks=c.matched_blocks, load=c.load,
                                         excluded=c.excluded,
                                         offloaded_blocks=c.offloaded_blocks)
                    for c in d.candidates[:_MAX_CANDIDATES]],
        decode_node_id=d.decode_node_id, decode_address=d.decode_address,
        decode_matched_blocks=d.decode_matched_blocks, transfer_blocks=d.transfer_blocks,
        decode_reason=d.decode_reason, offloaded_blocks=d.offloaded_blocks,
        expected_offloaded_tokens=d.expected_offloaded_tokens)


def complete(core: RouterCore, req: router_pb2.CompleteRequest) -> router_pb2.CompleteResponse:
    """Complete through the core (``prefill_only``: the prefill half of a pair)."""
    if req.prefill_only:
        return router_pb2.CompleteResponse(released=core.complete_prefill(req.request_id))
    cached = req.cached_tokens if req.HasField("cached_tokens") else None
    return router_pb2.CompleteResponse(
        released=core.complete(req.request_id, req.success, cached))


def stats(core: RouterCore) -> router_pb2.StatsResponse:
    """The core's counters and state as a StatsResponse."""
    inflight = core.tracker.inflight_by_node()
    src = core.source
    return router_pb2.StatsResponse(
        decisions_by_policy=core.decisions_by_policy,
        degraded_decisions=core.degraded_decisions,
        inflight_by_node=inflight,
        nodes_known=src.nodes_known(),
        registry_connected=src.connected,
        registry_staleness_s=src.staleness_s(),
        default_policy=core.settings.default_policy,
        policies=core.policies.names,
        inflight_expired=core.tracker.expired_total,
        predicted_cached_tokens=core.predicted_cached_tokens,
        reported_cached_tokens=core.reported_cached_tokens)
