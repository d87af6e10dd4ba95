"""The routing core's placement source over the simulated fleet (``--mode sim``).

What the registry would answer at simulated time ``now``: every node's prefix overlap from its
cache as the registry believes it (optionally ``heartbeat_delay_s`` old) and its last reported
queue, usage and eviction rate. It is *local* (answers from memory), so the replay calls
:meth:`router_service.core.RouterCore.decide_local` — the same decision the served router makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from router_service.placement import DepartureHook, NodeState, Placement


class SimNode(Protocol):
    """What the source reads from one simulated node."""

    nid: str

    def believed_match(self, hashes: Sequence[int], now: float) -> int:
        """Leading blocks the registry believes cached at ``now``."""
        ...

    def reported(self, now: float) -> tuple[int, int, int, int, float]:
        """(queue depth, running, used blocks, capacity blocks, eviction rate) as reported."""
        ...

    def prefill_rate(self, now: float) -> float:
        """Prefill tokens/s measured from the engine (0 = not yet), as last reported."""
        ...


class SimPlacementSource:
    """A local PlacementSource over simulated nodes; ``now`` is read from a callable."""

    mode = "sim"
    local = True
    connected = True

    def __init__(self, nodes: Sequence[SimNode], model: str, block_size: int,
                 clock: Callable[[], float], roles: Sequence[str] | None = None,
                 calibrate: bool = True) -> None:
        self._nodes = list(nodes)
        self._calibrate = calibrate
        self._model = model
        self._block_size = block_size
        self._clock = clock
        self._states = [NodeState(n.nid, n.nid, model) for n in self._nodes]
        for st, role in zip(self._states, roles or (), strict=False):
            st.role = role  # disaggregated fleets: prefill / decode / both

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Nothing to stop."""

    def staleness_s(self) -> float:
        """Always live."""
        return 0.0

    def registry_block_size(self) -> int:
        """The workload's block size."""
        return self._block_size

    async def lookup(self, block_hashes: Sequence[int], model: str) -> Placement:
        """See :meth:`lookup_local`."""
        return self.lookup_local(block_hashes, model)

    def lookup_local(self, block_hashes: Sequence[int], model: str) -> Placement:
        """Every node with its believed overlap and reported load at the current time."""
        if model != self._model:
            return Placement([], self._block_size)
        now = self._clock()
        out: list[tuple[NodeState, int]] = []
        for node, st in zip(self._nodes, self._states, strict=True):
            (st.queue_depth, st.running, st.used_blocks, st.capacity_blocks,
             st.eviction_rate) = node.reported(now)
            if self._calibrate:
                st.prefill_tokens_per_s = node.prefill_rate(now)
            out.append((st, node.believed_match(block_hashes, now)))
        return Placement(out, self._block_size)

    def last_known(self) -> list[NodeState]:
        """The simulated nodes."""
        return list(self._states)

    def nodes_known(self) -> int:
        """How many simulated nodes."""
        return len(self._states)

    def on_departure(self, hook: DepartureHook) -> None:
        """Simulated nodes never leave."""
