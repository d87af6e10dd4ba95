"""The routing-policy interface. Imports no policy implementation.

A policy is a small object with a ``name`` and a :meth:`Policy.choose` method: given a request
(its canonical block hashes and sizes) and a snapshot of candidate nodes (overlap, load, usage),
return a :class:`Decision`. Policies do no I/O and read no clock: everything they need is in the
two arguments, so the router service and the in-process benchmark (``kvroute bench --mode sim``)
run the very same code. A policy may keep internal state that depends only on what it was asked
(round-robin position, consistent-hash ring), never on wall-clock time; state changes happen in
:meth:`Policy.commit`, called by the routing core once it acts on a decision, never while
scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class NodeView:
    """One candidate node as the router sees it at decision time."""

    node_id: str
    """Registry node id."""
    address: str
    """Inference address of the node."""
    matched_blocks: int
    """Longest prefix of the request's blocks cached on the node (registry's belief)."""
    inflight: int
    """Requests this router sent to the node that have not completed."""
    queue_depth: int
    """Requests waiting in the engine's queue, as last reported through the registry."""
    running: int
    """Requests running on the engine, as last reported."""
    used_blocks: int
    """KV blocks in use on the engine."""
    capacity_blocks: int
    """KV capacity of the engine in blocks (0 = unknown)."""
    eviction_rate: float
    """Evictions per second, smoothed by the registry."""
    pending_prefill_tokens: float = 0.0
    """Prefill work (uncached prompt tokens) the router estimates is still queued on the node."""
    healthy: bool = True
    """False when draining or late; policies must never choose an unhealthy node."""
    prefill_tokens_per_s: float = 0.0
    """The node's calibrated prefill rate, learned from its engine's metrics (0 = unknown:
    policies use their configured rate)."""
    offloaded_blocks: int = 0
    """Blocks right after ``matched_blocks`` the node holds on an offloading medium (CPU,
    DISK...): the engine loads them back instead of recomputing them (registry's belief)."""
    index_complete: bool = True
    """False when the node's agent reports its view of the engine cache incomplete (late
    join, lost batches, wrong topic): ``matched_blocks`` is then a lower bound, and a
    missing prefix is not evidence of a miss."""
    role: str = "both"
    """The node's role: ``both`` (aggregated engine), ``prefill`` (prefill-only: its in-flight
    requests are its prefill queue, nothing decodes there) or ``decode``."""

    @property
    def usage(self) -> float:
        """Fraction of KV capacity in use (0 when capacity is unknown)."""
        return self.used_blocks / self.capacity_blocks if self.capacity_blocks else 0.0

    @property
    def load(self) -> int:
        """Router-counted in-flight requests plus the engine's reported queue."""
        return self.inflight + self.queue_depth


@dataclass(frozen=True, slots=True)
class RequestView:
    """The request being routed."""

    request_id: str
    """Caller's id."""
    block_hashes: Sequence[int]
    """Canonical hashes of the prompt's full blocks, block 0 first."""
    prompt_tokens: int
    """Prompt length in tokens."""
    block_size: int
    """Tokens per block."""
    session_key: str | None = None
    """Session id, or None (policies may derive a prompt-prefix key instead)."""
    output_tokens: int = 0
    """Expected output tokens (0 = unknown)."""
    fleet_nodes: int = 0
    """Nodes of the model when the core narrowed the candidates (0 = the candidates are all)."""
    fleet_inflight: int = 0
    """Requests in flight over the whole fleet, with ``fleet_nodes`` (load-cap mean)."""
    replicas: int = 1
    """Router replicas deciding side by side (this one + the live peers of its shared view):
    > 1 means decisions made at the same moment elsewhere are not in the load figures yet."""
    replica_rank: int = 0
    """This replica's place (0 .. replicas - 1) among them, by sorted replica id: replicas
    with the same view break the symmetry with it."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One node's score, for explaining a decision."""

    node_id: str
    score: float
    """Policy-specific; see each policy's docstring for the direction."""
    matched_blocks: int
    load: int
    excluded: str = ""
    """Non-empty when the node was not eligible (and why)."""
    offloaded_blocks: int = 0
    """Blocks after ``matched_blocks`` held on the node's offloading medium."""


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's choice."""

    node_id: str
    """Chosen node."""
    matched_blocks: int
    """Prefix blocks cached on the chosen node (registry's belief)."""
    reason: str
    """Why, in words an operator can read."""
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)
    """Scores of the nodes considered, best first (may be empty for trivial policies)."""


class NoEligibleNode(Exception):
    """No healthy candidate: the router answers UNAVAILABLE."""


@runtime_checkable
class Policy(Protocol):
    """A routing policy."""

    name: str
    """Name used in settings, requests, metrics and reasons."""

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """Pick a node among ``nodes``; raise :class:`NoEligibleNode` if none is healthy.

        Scoring only: the policy's state must not change here (see :meth:`commit`)."""
        ...

    def commit(self, request: RequestView, decision: Decision) -> None:
        """The router acted on ``decision``: update state (turns, recent routes, averages)."""
        ...


def healthy_nodes(nodes: Sequence[NodeView]) -> list[NodeView]:
    """The healthy candidates, or NoEligibleNode when there are none."""
    out = [n for n in nodes if n.healthy]
    if not out:
        raise NoEligibleNode("no healthy node serves this model")
    return out


def choose_and_commit(policy: Policy, request: RequestView,
                      nodes: Sequence[NodeView]) -> Decision:
    """Choose, then commit the choice (what the routing core does; handy in tests)."""
    decision = policy.choose(request, nodes)
    policy.commit(request, decision)
    return decision
