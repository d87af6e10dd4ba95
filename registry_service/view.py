"""A replica's in-memory view of the fleet: nodes, block index, per-model slot masks.

Every change, whether written by this replica or seen through the store's watch, goes through
:meth:`ReplicaView.apply`, which is idempotent: deltas carry (snapshot generation, seq) and
snapshots a generation, so an echo of a change already applied is ignored. Two replicas that
apply the same store history end with the same view.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from kvroute.index import DEVICE, OFFLOADED, BitmaskIndex, PrefixIndex, SlotTable
from registry_service.metrics import RegistryMetrics
from registry_service.nodes import Change, Fanout, LiveNode, now_ms
from registry_service.store.base import (
    Delta,
    DeltaPut,
    HashArray,
    LoadResult,
    NodeGone,
    NodePut,
    NodeRecord,
    SnapshotPut,
    StatusPut,
    StoreEvent,
)

log = logging.getLogger(__name__)
STALL_AFTER_S = 1.5
"""A gap this long between two moments this replica's event loop was seen running (its health
sweep runs every 0.5 s) means the loop stalled for at least a second."""


class ReplicaView:
    """Nodes and block placement as this replica knows them."""

    def __init__(self, fanout: Fanout, metrics: RegistryMetrics, late_after_s: float) -> None:
        self.index: PrefixIndex = BitmaskIndex()
        self.slots = SlotTable()
        self.nodes: dict[str, LiveNode] = {}
        self._by_model: dict[str, list[LiveNode]] = {}
        """Nodes per model in registration order; dropped whenever membership changes."""
        self.fanout = fanout
        self.metrics = metrics
        self.late_after_s = late_after_s
        self.on_drop: Callable[[int], None] = lambda entries: None
        """Called with the entries dropped when a node leaves (the server trims the heap)."""
        self.deregistered: set[tuple[str, int]] = set()
        """(node, epoch) this replica deleted itself: their removal is not a lease expiry."""
        self._ran_mono = time.monotonic()
        """When this replica's event loop was last seen running (:meth:`note_running`)."""
        self._stall_watch = False
        """Whether :meth:`note_running` judges gaps (only while the health sweep runs: before
        it starts, e.g. during a slow first listing, and while draining, gaps are no stall)."""

    # ---- nodes ----------------------------------------------------------------------------
    def _add(self, rec: NodeRecord) -> LiveNode:
        state = LiveNode(rec, self.slots.assign(rec.node_id, rec.model))
        self.index.add_node(state.slot)
        self.nodes[rec.node_id] = state
        self._by_model.pop(rec.model, None)
        self.fanout.publish(Change("upsert", rec.node_id, added=True))
        return state

    def drop(self, node_id: str, expired: bool) -> int:
        """Forget a node and its blocks; returns blocks dropped."""
        state = self.nodes.pop(node_id, None)
        if state is None:
            return 0
        dropped = self.index.drop_node(state.slot)
        self.on_drop(dropped)
        self.slots.release(node_id)
        self._by_model.pop(state.record.model, None)
        if expired:
            self.metrics.lease_expiries.inc()
            log.info("node %s (epoch %d) left: lease expired", node_id, state.record.epoch)
        self.fanout.publish(Change("removed", node_id))
        return dropped

    # ---- events ---------------------------------------------------------------------------
    def apply(self, ev: StoreEvent) -> None:
        """Apply one store event (idempotent)."""
        if isinstance(ev, NodePut):
            self._node_put(ev.record)
        elif isinstance(ev, NodeGone):
            state = self.nodes.get(ev.node_id)
            if state is not None and ev.epoch in (0, state.record.epoch):
                key = (ev.node_id, state.record.epoch)
                expired = key not in self.deregistered
                self.deregistered.discard(key)
                self.drop(ev.node_id, expired)
        elif isinstance(ev, StatusPut):
            state = self.nodes.get(ev.node_id)
            if state is not None and (ev.status.heartbeat_unix_ms
                                      >= state.status.heartbeat_unix_ms):
                state.status = ev.status
                state.trusted_until_ms = 0  # heard of (through another replica): timing rules
                self.fanout.publish(Change("upsert", ev.node_id))
        elif isinstance(ev, DeltaPut):
            state = self.nodes.get(ev.node_id)
            if state is not None and state.record.epoch == ev.epoch:
                self.apply_delta(state, ev.delta)
        elif isinstance(ev, SnapshotPut):
            state = self.nodes.get(ev.node_id)
            if state is not None and state.record.epoch == ev.epoch:
                self.apply_snapshot(state, ev)

    def _node_put(self, rec: NodeRecord) -> None:
        state = self.nodes.get(rec.node_id)
        if state is not None:
            if rec.epoch < state.record.epoch:
                return
            if rec.epoch == state.record.epoch:
                if rec != state.record:
                    self._by_model.pop(state.record.model, None)
                    self._by_model.pop(rec.model, None)
                    self.slots.assign(rec.node_id, rec.model)
                    state.record = rec
                    self.fanout.publish(Change("upsert", rec.node_id))
                return
            self.deregistered.discard((rec.node_id, state.record.epoch))
            self.drop(rec.node_id, expired=False)
        self._add(rec)

    def apply_delta(self, state: LiveNode, delta: Delta) -> bool:
        """Apply a delta if it is the next one on the node's generation; True if applied."""
        if delta.base_gen != state.gen or delta.seq <= state.applied_seq:
            return False
        if delta.seq != state.applied_seq + 1:
            log.warning("node %s: delta seq %d applied after %d (a gap in the store)",
                        state.node_id, delta.seq, state.applied_seq)
        slot = state.slot
        if delta.cleared:
            self.index.clear(slot)
        if delta.removed.size:
            self.index.remove(slot, delta.removed.tolist())
        if delta.stored.size:
            self.index.add(slot, delta.stored.tolist())
        if delta.removed_offloaded.size:
            self.index.remove(slot, delta.removed_offloaded.tolist(), OFFLOADED)
        if delta.stored_offloaded.size:
            self.index.add(slot, delta.stored_offloaded.tolist(), OFFLOADED)
        state.applied_seq = delta.seq
        state.deltas_since_snapshot += 1
        self.fanout.publish(Change("blocks", state.node_id, cleared=delta.cleared,
                                   stored=delta.stored, removed=delta.removed,
                                   stored_offloaded=delta.stored_offloaded,
                                   removed_offloaded=delta.removed_offloaded))
        return True

    def tier_sets(self, state: LiveNode) -> tuple[HashArray, HashArray]:
        """The node's (device, offloaded) block sets, sorted."""
        return self.index.blocks(state.slot), self.index.blocks(state.slot, OFFLOADED)

    def after_delta(self, state: LiveNode, delta: Delta) -> tuple[HashArray, HashArray]:
        """The node's (device, offloaded) sets once ``delta`` is applied (not applying it)."""
        out = []
        for tier, stored, removed in ((DEVICE, delta.stored, delta.removed),
                                      (OFFLOADED, delta.stored_offloaded,
                                       delta.removed_offloaded)):
            base = (np.zeros(0, dtype=np.uint64) if delta.cleared
                    else self.index.blocks(state.slot, tier))
            out.append(np.union1d(np.setdiff1d(base, removed), stored).astype(np.uint64))
        return out[0], out[1]

    def apply_snapshot(self, state: LiveNode, snap: SnapshotPut) -> bool:
        """Switch the node to snapshot ``snap.gen``; rebuild its blocks when they differ."""
        if snap.gen <= state.gen:
            return False
        if snap.replace or snap.through_seq != state.applied_seq:
            self.index.clear(state.slot)
            self.index.add(state.slot, snap.hashes.tolist())
            self.index.add(state.slot, snap.offloaded.tolist(), OFFLOADED)
            self.fanout.publish(Change("blocks", state.node_id, cleared=True,
                                       stored=snap.hashes, stored_offloaded=snap.offloaded))
        state.gen = snap.gen
        state.applied_seq = snap.through_seq
        state.deltas_since_snapshot = 0
        return True

    def reconcile(self, loaded: LoadResult) -> None:
        """Make the view equal to a fresh listing of the store.

        Every listed node's lease was alive at the listing, so each counts as healthy for up
        to its lease TTL from now even before this replica hears a heartbeat (agents of a
        restarted replica reconnect within about a second; a node that stopped loses its
        lease within the TTL and etcd deletes it, which the watch applies).
        """
        present = {ev.record.node_id for ev in loaded.events if isinstance(ev, NodePut)}
        for node_id in [n for n in self.nodes if n not in present]:
            self.drop(node_id, expired=True)
        for ev in loaded.events:
            self.apply(ev)
        t = now_ms()
        for node_id in present:
            state = self.nodes.get(node_id)
            if state is not None and not state.healthy(self.late_after_s, t):
                state.trusted_until_ms = t + state.record.lease_ttl_s * 1000

    def watch_stalls(self, on: bool) -> None:
        """Start (the health sweep starts) or stop (it stops: draining) judging gaps."""
        self._stall_watch = on
        self._ran_mono = time.monotonic()

    def note_running(self) -> None:
        """Called by the health sweep and before every health read (Lookup, node info): if the
        loop was not seen running for :data:`STALL_AFTER_S`, it stalled, and the nodes on time
        when it was last seen running are forgiven (:meth:`forgive_stall`) before anything reads
        their health — whichever runs first after the stall, a queued Lookup or the sweep."""
        mono = time.monotonic()
        gap = mono - self._ran_mono
        self._ran_mono = mono
        if gap <= STALL_AFTER_S or not self._stall_watch:
            return
        n = self.forgive_stall(now_ms(), gap)
        log.warning("this registry did not run for %.1f s (event loop stalled): the %d node(s) "
                    "on time before it get one more late window (%.1f s) for their queued "
                    "heartbeats", gap, n, self.late_after_s)

    def forgive_stall(self, at_ms: int, stalled_s: float) -> int:
        """This replica did not run for ``stalled_s`` up to ``at_ms``: the heartbeats of that
        time sit unread in its sockets, so a node that was on time when it stopped running is
        trusted for one more late window from now (its next heartbeat, read or new, clears the
        trust; a node that really stopped goes late after it). Returns how many nodes."""
        since = at_ms - int(stalled_s * 1000)
        until = at_ms + int(self.late_after_s * 1000)
        n = 0
        for state in self.nodes.values():
            if state.healthy(self.late_after_s, since):
                state.trusted_until_ms = max(state.trusted_until_ms, until)
                n += 1
        return n

    # ---- queries --------------------------------------------------------------------------
    def candidates(self, model: str, include_unhealthy: bool) -> list[LiveNode]:
        """Nodes serving ``model`` (all models when empty), healthy ones unless asked.

        The list for a model is kept between calls (do not modify it).
        """
        if model:
            nodes = self._by_model.get(model)
            if nodes is None:
                nodes = [s for s in self.nodes.values() if s.record.model == model]
                if nodes:
                    self._by_model[model] = nodes
        else:
            nodes = list(self.nodes.values())
        if not include_unhealthy:
            late, t = self.late_after_s, now_ms()
            nodes = [s for s in nodes if s.healthy(late, t)]
        return nodes

    def model_size(self, model: str) -> int:
        """Nodes of ``model`` (all nodes when empty), healthy or not; O(1) once listed."""
        return len(self.candidates(model, True)) if model else len(self.nodes)

    def lookup(self, hashes: Sequence[int], model: str) -> dict[int, int]:
        """Matched device prefix length per slot of ``model``'s nodes (all nodes when empty);
        slots with no match omitted. Cost grows with the matched length, not with the fleet."""
        if not len(hashes):
            return {}
        mask = self.slots.model_mask(model) if model else self.slots.all_mask()
        return self.index.longest_prefix(hashes, mask) if mask else {}

    def lookup_tiered(self, hashes: Sequence[int], model: str) -> dict[int, tuple[int, int]]:
        """(device run, offloaded run after it) per slot, as :meth:`lookup` (see
        :meth:`kvroute.index.PrefixIndex.tiered_prefix`)."""
        if not len(hashes):
            return {}
        mask = self.slots.model_mask(model) if model else self.slots.all_mask()
        return self.index.tiered_prefix(hashes, mask) if mask else {}
