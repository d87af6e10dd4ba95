"""Plain results of client calls (no protobuf in callers' code)."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.v1 import registry_pb2, router_pb2


@dataclass(frozen=True, slots=True)
class Route:
    """A routing decision: where to send the request and why."""

    request_id: str
    node_id: str
    address: str
    policy: str
    matched_blocks: int
    expected_cached_tokens: int
    reason: str
    degraded: bool
    prompt_tokens: int

    @classmethod
    def from_pb(cls, r: router_pb2.RouteResponse) -> Route:
        """From a RouteResponse."""
        return cls(r.request_id, r.node_id, r.address, r.policy, r.matched_blocks,
                   r.expected_cached_tokens, r.reason, r.degraded, r.prompt_tokens)


@dataclass(frozen=True, slots=True)
class Node:
    """A node as the registry sees it."""

    node_id: str
    address: str
    model: str
    healthy: bool
    blocks_indexed: int
    used_blocks: int
    capacity_blocks: int
    queue_depth: int
    lease_remaining_s: float

    @classmethod
    def from_pb(cls, n: registry_pb2.NodeInfo) -> Node:
        """From a ListNodes entry."""
        return cls(n.node_id, n.address, n.model, n.healthy, n.blocks_indexed, n.used_blocks,
                   n.capacity_blocks, n.queue_depth, n.lease_remaining_s)


def route_request(request_id: str, *, token_ids: list[int] | None = None,
                  prompt: str | None = None, model: str = "", session_id: str | None = None,
                  policy: str | None = None, lora_name: str | None = None,
                  cache_salt: str | None = None,
                  max_output_tokens: int = 0) -> router_pb2.RouteRequest:
    """The RouteRequest message (token ids preferred over prompt text)."""
    if not token_ids and not prompt:
        raise ValueError("give token_ids (preferred) or prompt")
    req = router_pb2.RouteRequest(request_id=request_id, model=model,
                                  token_ids=token_ids or [], prompt=prompt or "",
                                  lora_name=lora_name or "", cache_salt=cache_salt or "",
                                  max_output_tokens=max_output_tokens)
    if session_id:
        req.session_id = session_id
    if policy:
        req.policy = policy
    return req
