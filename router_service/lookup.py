"""The routing core's lookup step: the placement of one request, narrowed on large fleets.

:class:`PlacementLookup` asks the placement source (the index mirror from memory, or the
registry stream over the network) for the nodes of the request's model with their matched
prefix. On a fleet larger than ``--max-candidates`` and for a policy that allows it
(:mod:`router_service.narrowing`) it asks only for the nodes holding a prefix and scores those
plus the least-loaded ones, so neither the lookup nor the decision grows with the nodes that
match nothing: in mirror mode from the mirror's own index, in stream mode with a
``matched_only`` Lookup and the source's node list. Nodes whose match continues on their
offloaded (CPU/disk) tier rank by their whole run (GPU + offloaded blocks) for that selection,
and the placement carries their offloaded blocks. An unreachable registry or a too-stale mirror
is not an error here: the step returns why, and the core degrades.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from kvroute.errors import Unavailable
from router_service.load import LoadTracker
from router_service.narrowing import Narrower
from router_service.placement import NodeState, Placement, PlacementSource
from router_service.policies.base import Policy, RequestView

Found = tuple[Placement | None, str, RequestView]
"""(placement, "" , view) — or (None, why the registry could not answer, view). The view
carries the fleet-wide load figures when the candidates were narrowed."""


class _Narrowable(Protocol):
    """What narrowing reads from a placement source (both kinds below)."""

    def members(self, model: str) -> list[NodeState]:
        """Nodes of ``model``."""
        ...

    def node(self, node_id: str) -> NodeState | None:
        """A node by id."""
        ...

    def registry_block_size(self) -> int:
        """The registry's block size."""
        ...


@runtime_checkable
class NarrowingSource(_Narrowable, Protocol):
    """A local placement source that can list a model's nodes and only the matching ones."""

    def matches_local(self, block_hashes: Sequence[int], model: str) -> dict[str, int]:
        """Node id -> matched blocks, only for nodes holding a prefix."""
        ...

    def offloaded_local(self, block_hashes: Sequence[int], model: str) -> dict[str, int]:
        """Node id -> offloaded blocks continuing its device prefix, only nodes with some."""
        ...


@runtime_checkable
class RemoteNarrowingSource(_Narrowable, Protocol):
    """A remote placement source that can ask for the matching nodes only."""

    async def matches(self, block_hashes: Sequence[int], model: str,
                      ) -> tuple[dict[str, int], int, dict[str, int]]:
        """(node id -> matched device blocks for nodes holding a prefix on some tier, nodes
        of the model, node id -> offloaded blocks continuing the device prefix)."""
        ...


class PlacementLookup:
    """The lookup step of every decision (module docstring)."""

    def __init__(self, source: PlacementSource, tracker: LoadTracker,
                 max_candidates: int) -> None:
        self.source = source
        self._tracker = tracker
        self._max = max_candidates
        self._narrower = Narrower(max_candidates)
        on = bool(max_candidates)
        self._local = (source if on and source.local and isinstance(source, NarrowingSource)
                       else None)
        self._remote = (source if on and not source.local
                        and isinstance(source, RemoteNarrowingSource) else None)

    def local(self, policy: Policy, view: RequestView, model: str) -> Found:
        """From memory (``source.local``)."""
        try:
            src = self._local
            members = self._members(policy, src, model)
            if src is not None and members is not None:
                matches = src.matches_local(view.block_hashes, model)
                off = src.offloaded_local(view.block_hashes, model)
                return self._narrowed(view, src, members, matches, len(members), off)
            return self.source.lookup_local(view.block_hashes, model), "", view
        except Unavailable as exc:
            return None, exc.message, view

    async def remote(self, policy: Policy, view: RequestView, model: str) -> Found:
        """Over the network. A narrowed lookup asks the registry for the matching nodes only;
        when its node count disagrees with the source's node list (a node joined or left
        since the last refresh) this decision asks for every node instead, which also brings
        the list up to date."""
        try:
            src = self._remote
            members = self._members(policy, src, model)
            if src is not None and members is not None:
                matches, total, off = await src.matches(view.block_hashes, model)
                if total == len(members):
                    return self._narrowed(view, src, members, matches, total, off)
            return await self.source.lookup(view.block_hashes, model), "", view
        except Unavailable as exc:
            return None, exc.message, view

    def _members(self, policy: Policy, src: _Narrowable | None,
                 model: str) -> list[NodeState] | None:
        """The model's nodes when this decision scores a narrowed candidate set: a narrowing
        source, a policy that allows it and more nodes than ``--max-candidates``. None =
        score every node."""
        if src is None or not getattr(policy, "narrowable", False):
            return None
        members = src.members(model)
        return members if len(members) > self._max else None

    def _narrowed(self, view: RequestView, src: _Narrowable, members: list[NodeState],
                  matches: dict[str, int], total: int, off: dict[str, int]) -> Found:
        tracker = self._tracker
        if off:  # rank by the whole run; the pairs keep the device prefix
            rank = dict(matches)
            for nid, o in off.items():
                rank[nid] = rank.get(nid, 0) + o
            get = matches.get
            pairs = [(n, get(n.node_id, 0)) for n, _ in
                     self._narrower.select(members, rank, src.node, tracker.counts())]
        else:
            pairs = self._narrower.select(members, matches, src.node, tracker.counts())
        view = dataclasses.replace(view, fleet_nodes=total,
                                   fleet_inflight=tracker.total_inflight)
        return Placement(pairs, src.registry_block_size(), off), "", view
