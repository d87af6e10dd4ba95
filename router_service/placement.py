"""What the router knows about nodes and placement, and the interface of its registry link.

Two implementations, one per file: :mod:`.mirror_source` (a local mirror of the index fed by
``Registry.WatchPlacement``) and :mod:`.stream_source` (one persistent ``Registry.LookupStream``).
Both keep the last known nodes so the router can degrade to least_loaded when the registry is
unreachable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvroute.v1 import registry_pb2


@dataclass(slots=True)
class NodeState:
    """A node's record and last reported usage."""

    node_id: str
    address: str
    model: str
    used_blocks: int = 0
    capacity_blocks: int = 0
    queue_depth: int = 0
    running: int = 0
    eviction_rate: float = 0.0
    healthy: bool = True
    engine_block_size: int = 0
    """The engine's own block size in tokens (0 = not reported: the registry's)."""
    engine_lookahead_tokens: int = 0
    """Tokens after each block the engine's hashes cover (vLLM lookahead hashing)."""
    index_state: int = 0
    """The agent's IndexState (registry.proto); 0 = not reported."""
    role: str = "both"
    """``prefill``, ``decode`` or ``both`` (aggregated); see :mod:`router_service.disagg`."""
    prefill_tokens_per_s: float = 0.0
    """Prefill rate calibrated from the engine's metrics (0 = unknown: the router's flag)."""

    @classmethod
    def from_info(cls, info: registry_pb2.NodeInfo) -> NodeState:
        """From a ListNodes / WatchPlacement record."""
        return cls(info.node_id, info.address, info.model, info.used_blocks,
                   info.capacity_blocks, info.queue_depth, info.running, info.eviction_rate,
                   info.healthy, info.engine_block_size, info.engine_lookahead_tokens,
                   int(info.index_state), info.role or "both",
                   prefill_tokens_per_s=info.prefill_tokens_per_s)

    @classmethod
    def from_match(cls, m: registry_pb2.NodeMatch, model: str) -> NodeState:
        """From a Lookup answer."""
        return cls(m.node_id, m.address, model, m.used_blocks, m.capacity_blocks,
                   m.queue_depth, m.running, m.eviction_rate, m.healthy, m.engine_block_size,
                   m.engine_lookahead_tokens, int(m.index_state), m.role or "both",
                   prefill_tokens_per_s=m.prefill_tokens_per_s)

    def update_from(self, other: NodeState) -> None:
        """Take every field of ``other`` (a fresher record of the same node), in place, so
        lists holding this object see the new values at once."""
        for f in _FIELDS:
            setattr(self, f, getattr(other, f))

    def reusable_blocks(self, matched: int, block_size: int, prompt_tokens: int) -> int:
        """Registry blocks of a matched prefix this node's engine actually reuses.

        Engines reuse whole engine blocks only (a 32-token engine block is 2 registry blocks
        of 16: a match ending inside one does not count), and never the prompt's last token
        (vLLM and SGLang recompute at least one token for its logits; with lookahead hashing
        the last ``engine_lookahead_tokens``).
        """
        if matched <= 0 or block_size <= 0:
            return 0
        ebs = self.engine_block_size or block_size
        limit = prompt_tokens - max(1, self.engine_lookahead_tokens)
        tokens = min(matched * block_size, max(0, limit))
        return (tokens // ebs * ebs) // block_size

    def reusable_tiers(self, matched: int, offloaded: int, block_size: int,
                       prompt_tokens: int) -> tuple[int, int]:
        """(device blocks, offloaded blocks after them) the engine reuses, with the rules of
        :meth:`reusable_blocks` applied to the whole run: the offloaded part is what the
        engine reuses beyond its device hit (whole engine blocks, never the last token)."""
        dev = self.reusable_blocks(matched, block_size, prompt_tokens)
        if not offloaded:
            return dev, 0
        return dev, self.reusable_blocks(matched + offloaded, block_size, prompt_tokens) - dev

    @property
    def index_complete(self) -> bool:
        """False when the node's agent reports its index partial or empty for lack of events
        (registry.proto IndexState 2/3): a missing prefix there may not be a miss."""
        return self.index_state in (0, 1)


_FIELDS = tuple(f.name for f in dataclasses.fields(NodeState))


DepartureHook = Callable[[str], None]
"""Called with a node id when the node leaves the registry (lease expired, deregistered)."""


@dataclass(slots=True)
class Placement:
    """Answer of a lookup: every node serving the model with its matched prefix length."""

    nodes: list[tuple[NodeState, int]]
    """(node, matched blocks) for each node of the model, healthy or not: the device-tier
    (GPU) prefix."""
    block_size: int
    """The registry's block size (0 = not known yet)."""
    offloaded: dict[str, int] = field(default_factory=dict)
    """Node id -> blocks after its device prefix held on an offloading medium (the lower
    tier); nodes without any omitted."""


class PlacementSource(Protocol):
    """The router's link to the registry."""

    mode: str
    """``mirror`` or ``stream``."""

    local: bool
    """True when lookups answer from memory: :meth:`lookup_local` may be called (no await)."""

    async def start(self) -> None:
        """Start background work (connect, follow); returns without waiting for the registry."""
        ...

    async def stop(self) -> None:
        """Stop background work and close the channel."""
        ...

    @property
    def connected(self) -> bool:
        """True while the link to the registry is up."""
        ...

    def staleness_s(self) -> float:
        """Age in seconds of the newest registry data held (0 when live)."""
        ...

    def registry_block_size(self) -> int:
        """Block size the registry reported (0 = unknown)."""
        ...

    async def lookup(self, block_hashes: Sequence[int], model: str) -> Placement:
        """Nodes of ``model`` with their matched prefix; raises Unavailable when the registry
        cannot answer (the caller degrades)."""
        ...

    def lookup_local(self, block_hashes: Sequence[int], model: str) -> Placement:
        """:meth:`lookup` without an await; only when :attr:`local` (else NotImplementedError)."""
        ...

    def last_known(self) -> list[NodeState]:
        """Every node known from the registry at last contact (for degraded routing)."""
        ...

    def nodes_known(self) -> int:
        """How many nodes are known (safe to call from the metrics thread)."""
        ...

    def on_departure(self, hook: DepartureHook) -> None:
        """Call ``hook(node_id)`` whenever a known node leaves the registry (the core drops
        what it estimated about the node, such as its queued prefill)."""
        ...
