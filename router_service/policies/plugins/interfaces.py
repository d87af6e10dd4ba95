"""Plugin interfaces of a scheduling policy (imports no implementation).

One decision is a :class:`Cycle`: the request, the healthy candidate nodes and, per node, the
effective prefix overlap (the registry's ``matched_blocks``, possibly raised by an
:class:`OverlapSource` that knows what was routed there recently). Filters exclude nodes with a
reason; scorers add weighted costs (lower is better; kv_aware's are seconds of estimated TTFT);
the picker chooses among the survivors. Plugins do not change their state while scoring:
:meth:`Plugin.commit` is called once the router acts on the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from router_service.policies.base import NodeView, RequestView


@dataclass(slots=True)
class Cycle:
    """One scheduling cycle's inputs, shared by every plugin."""

    request: RequestView
    nodes: Sequence[NodeView]
    """Healthy candidates."""
    matched: list[int]
    """Effective prefix overlap of each node, in blocks (same order as ``nodes``)."""
    total_inflight: int
    """Requests in flight over the fleet (all candidates, unless the core narrowed them)."""
    fleet_nodes: int = 0
    """Nodes the load is spread over (0 = ``len(nodes)``)."""


class Plugin(Protocol):
    """Common part of every plugin."""

    name: str
    """Typed name, used in settings, reasons and explanations."""

    def commit(self, cycle: Cycle, chosen: int) -> None:
        """The router acted on the decision for ``cycle.nodes[chosen]``: update state."""
        ...


class OverlapSource(Plugin, Protocol):
    """Raises per-node overlap above the registry's belief (e.g. recently routed prefixes)."""

    def overlap(self, request: RequestView, nodes: Sequence[NodeView]) -> list[int]:
        """Effective matched blocks per node."""
        ...


class Filter(Plugin, Protocol):
    """Excludes nodes."""

    def exclusions(self, cycle: Cycle) -> list[str]:
        """Per node: why it is excluded, or "" when it passes."""
        ...


class Scorer(Plugin, Protocol):
    """Scores nodes; the policy adds the weighted scores (lower is better)."""

    def scores(self, cycle: Cycle) -> list[float]:
        """Per node: the cost this scorer assigns."""
        ...


class Picker(Plugin, Protocol):
    """Chooses one node among those no filter excluded."""

    def pick(self, cycle: Cycle, scores: Sequence[float], eligible: Sequence[int]) -> int:
        """Index into ``cycle.nodes`` of the chosen node (``eligible`` is never empty)."""
        ...


@runtime_checkable
class RemoteObserver(Protocol):
    """A plugin that also learns from other router replicas' decisions (issue 19)."""

    def observe_remote(self, blocks: Sequence[int], node_id: str) -> None:
        """Another replica routed a request whose leading blocks are ``blocks`` to ``node_id``."""
        ...
