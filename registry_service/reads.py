"""The registry's reads, answered from this replica's memory (never etcd): Lookup, ListNodes,
WatchNodes, WatchPlacement.

The servicer adapts them to gRPC and nothing else, as it does for the writes in
:mod:`registry_service.core`.

Lookup's cost: the index walk grows with the matched prefix and the nodes holding it, never
with the nodes that hold none of it. The default answer lists every node of the model (one
NodeMatch each, so it grows with the fleet); ``matched_only`` lists just the nodes holding a
prefix, plus ``model_nodes``, for callers that know the fleet from elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np

from kvroute.errors import ResourceExhausted, Unavailable
from kvroute.index import OFFLOADED
from kvroute.v1 import registry_pb2 as pb
from registry_service import validate
from registry_service.metrics import RegistryMetrics
from registry_service.nodes import Change, Fanout, LiveNode, Subscription, now_ms
from registry_service.settings import RegistrySettings
from registry_service.view import ReplicaView

PLACEMENT_CHUNK = 65_536
"""Most hashes per PlacementEvent (~512 KiB), under every client's default 4 MiB limit."""


def node_info(s: LiveNode, late_after_s: float, blocks: int, offloaded: int = 0,
              ) -> pb.NodeInfo:
    """The NodeInfo message of a node."""
    r, st = s.record, s.status
    return pb.NodeInfo(
        node_id=r.node_id, address=r.address, model=r.model, block_size=r.block_size,
        capacity_blocks=s.capacity(), labels=r.labels, epoch=r.epoch,
        used_blocks=st.used_blocks, evictions_total=st.evictions_total,
        eviction_rate=st.eviction_rate, queue_depth=st.queue_depth, running=st.running,
        blocks_indexed=blocks, healthy=s.healthy(late_after_s),
        lease_remaining_s=round(s.lease_left_s(), 3), last_heartbeat_unix_ms=s.heartbeat_ms(),
        usage=s.usage(), engine_block_size=st.engine_block_size,
        engine_lookahead_tokens=st.engine_lookahead_tokens,
        index_state=pb.IndexState.ValueType(st.index_state), index_note=st.index_note,
        role=r.role, prefill_tokens_per_s=st.prefill_tokens_per_s,
        offloaded_blocks_indexed=offloaded)


def _match(s: LiveNode, matched: tuple[int, int], healthy: bool, blocks: int,
           offloaded_indexed: int) -> pb.NodeMatch:
    st = s.status
    return pb.NodeMatch(
        node_id=s.record.node_id, address=s.record.address, matched_blocks=matched[0],
        offloaded_blocks=matched[1], offloaded_blocks_indexed=offloaded_indexed,
        used_blocks=st.used_blocks, capacity_blocks=s.capacity(), usage=s.usage(),
        queue_depth=st.queue_depth, running=st.running, eviction_rate=st.eviction_rate,
        healthy=healthy, blocks_indexed=blocks, engine_block_size=st.engine_block_size,
        engine_lookahead_tokens=st.engine_lookahead_tokens,
        index_state=pb.IndexState.ValueType(st.index_state), index_note=st.index_note,
        role=s.record.role, prefill_tokens_per_s=st.prefill_tokens_per_s)


def _block_messages(ch: Change, chunk: int) -> list[pb.PlacementEvent]:
    """One block change as BLOCKS events: all removals first, then stores (device tier, then
    offloaded tier), each chunked, so applying them in order gives the same sets as applying
    the change at once."""
    def lst(a: np.ndarray | None) -> list[int]:
        return [] if a is None else a.tolist()

    out: list[pb.PlacementEvent] = []
    for field, hashes in (("removed", lst(ch.removed)), ("stored", lst(ch.stored)),
                          ("removed_offloaded", lst(ch.removed_offloaded)),
                          ("stored_offloaded", lst(ch.stored_offloaded))):
        for i in range(0, len(hashes), chunk):
            msg = pb.PlacementEvent(kind=pb.PlacementEvent.BLOCKS, node_id=ch.node_id)
            getattr(msg, field).extend(hashes[i:i + chunk])
            out.append(msg)
    if not out:
        out = [pb.PlacementEvent(kind=pb.PlacementEvent.BLOCKS, node_id=ch.node_id)]
    out[0].cleared = ch.cleared
    return out


class RegistryReads:
    """Every read RPC's answer, from the replica's :class:`ReplicaView`."""

    def __init__(self, settings: RegistrySettings, view: ReplicaView, fanout: Fanout,
                 metrics: RegistryMetrics) -> None:
        self.settings = settings
        self.view = view
        self.fanout = fanout
        self.metrics = metrics

    # ---- Lookup -------------------------------------------------------------------------
    def lookup(self, req: pb.LookupRequest) -> pb.LookupResponse:
        """Lookup: validated, then each node of ``req.model`` (every model when empty) with
        its matched prefix — healthy ones unless ``include_unhealthy``, only those holding a
        prefix (longest first) when ``matched_only``. Each match is the GPU prefix and the
        offloaded blocks continuing it (a node holding only offloaded blocks of the prefix
        holds a prefix too)."""
        t0 = time.perf_counter()
        validate.lookup(req, self.settings)
        view = self.view
        view.note_running()  # after a stall of this loop, forgive before reading health
        late, t, count = view.late_after_s, now_ms(), view.index.count
        matched = view.lookup_tiered(req.block_hashes, req.model)
        out: list[pb.NodeMatch] = []
        if req.matched_only:
            total = view.model_size(req.model)
            node_at, nodes = view.slots.node_at, view.nodes
            for slot, m in sorted(matched.items(), key=lambda kv: (-kv[1][0] - kv[1][1],
                                                                   -kv[1][0])):
                s = nodes[node_at(slot) or ""]
                healthy = s.healthy(late, t)
                if healthy or req.include_unhealthy:
                    out.append(_match(s, m, healthy, count(slot), count(slot, OFFLOADED)))
        else:
            members = view.candidates(req.model, True)
            total = len(members)
            get = matched.get
            none = (0, 0)
            for s in members:
                healthy = s.healthy(late, t)
                if healthy or req.include_unhealthy:
                    out.append(_match(s, get(s.slot, none), healthy, count(s.slot),
                                      count(s.slot, OFFLOADED)))
        self.metrics.lookups.inc()
        self.metrics.lookup_seconds.observe(time.perf_counter() - t0)
        return pb.LookupResponse(request_id=req.request_id, nodes=out,
                                 block_size=self.settings.block_size, model_nodes=total)

    # ---- node listings ------------------------------------------------------------------
    def info(self, s: LiveNode) -> pb.NodeInfo:
        """The NodeInfo of a node as this replica knows it now."""
        self.view.note_running()  # after a stall of this loop, forgive before reading health
        count = self.view.index.count
        return node_info(s, self.view.late_after_s, count(s.slot), count(s.slot, OFFLOADED))

    def list_nodes(self, model: str = "") -> list[pb.NodeInfo]:
        """ListNodes: every node of ``model`` (all models when empty), healthy or not, by id."""
        nodes = sorted(self.view.candidates(model, True), key=lambda s: s.node_id)
        return [self.info(s) for s in nodes]

    async def _changes(self, sub: Subscription, replica_id: str) -> AsyncIterator[Change]:
        while True:
            change = await sub.queue.get()
            if change.kind == "closing":
                raise Unavailable(f"registry replica {replica_id} is shutting down: "
                                  "watch again (another replica, or this one once restarted)")
            if change.kind == "overflow":
                raise ResourceExhausted(
                    "this watch fell more than --watch-queue-size events behind and was cut "
                    "off; watch again (you get a fresh snapshot)")
            yield change

    async def watch_nodes(self, model: str, replica_id: str,
                          ) -> AsyncGenerator[pb.NodeEvent, None]:
        """WatchNodes: a snapshot of ``model``'s nodes, SNAPSHOT_END, then their changes."""
        view = self.view
        sub = self.fanout.subscribe()
        try:
            first = [self.info(s) for s in view.candidates(model, True)]
            sent = {i.node_id for i in first}
            for info in first:
                yield pb.NodeEvent(type=pb.NodeEvent.SNAPSHOT, node=info)
            yield pb.NodeEvent(type=pb.NodeEvent.SNAPSHOT_END)
            async for ch in self._changes(sub, replica_id):
                if ch.kind == "removed" and ch.node_id in sent:
                    sent.discard(ch.node_id)
                    yield pb.NodeEvent(type=pb.NodeEvent.REMOVED,
                                       node=pb.NodeInfo(node_id=ch.node_id))
                elif ch.kind == "upsert":
                    s = view.nodes.get(ch.node_id)
                    if s is None or (model and s.record.model != model):
                        continue
                    kind = pb.NodeEvent.ADDED if ch.added else pb.NodeEvent.UPDATED
                    sent.add(ch.node_id)
                    yield pb.NodeEvent(type=kind, node=self.info(s))
        finally:
            self.fanout.unsubscribe(sub)

    async def watch_placement(self, model: str, replica_id: str,
                              ) -> AsyncGenerator[pb.PlacementEvent, None]:
        """WatchPlacement: every node of ``model`` with its blocks, SNAPSHOT_END, then every
        change (what a router's index mirror follows)."""
        view = self.view
        sub = self.fanout.subscribe()
        bs = self.settings.block_size
        chunk = max(1, min(PLACEMENT_CHUNK, self.settings.max_message_bytes // 16))
        try:
            nodes = view.candidates(model, True)
            first = [(self.info(s), *view.tier_sets(s)) for s in nodes]
            sent = {i.node_id for i, _, _ in first}
            for info, blocks, offloaded in first:
                yield pb.PlacementEvent(kind=pb.PlacementEvent.NODE_UPSERT, node_id=info.node_id,
                                        node=info, block_size=bs, sent_unix_ms=now_ms())
                for i in range(0, max(1, blocks.size), chunk):
                    yield pb.PlacementEvent(
                        kind=pb.PlacementEvent.BLOCKS, node_id=info.node_id, cleared=i == 0,
                        stored=blocks[i:i + chunk].tolist(), block_size=bs,
                        sent_unix_ms=now_ms())
                for i in range(0, offloaded.size, chunk):
                    yield pb.PlacementEvent(
                        kind=pb.PlacementEvent.BLOCKS, node_id=info.node_id,
                        stored_offloaded=offloaded[i:i + chunk].tolist(), block_size=bs,
                        sent_unix_ms=now_ms())
            yield pb.PlacementEvent(kind=pb.PlacementEvent.SNAPSHOT_END, block_size=bs,
                                    sent_unix_ms=now_ms())
            async for ch in self._changes(sub, replica_id):
                s = view.nodes.get(ch.node_id)
                if ch.kind == "removed":
                    if ch.node_id in sent:
                        sent.discard(ch.node_id)
                        yield pb.PlacementEvent(kind=pb.PlacementEvent.NODE_REMOVED,
                                                node_id=ch.node_id, block_size=bs,
                                                sent_unix_ms=now_ms())
                    continue
                if s is None or (model and s.record.model != model):
                    continue
                if ch.kind == "upsert":
                    sent.add(ch.node_id)
                    yield pb.PlacementEvent(kind=pb.PlacementEvent.NODE_UPSERT,
                                            node_id=ch.node_id, node=self.info(s),
                                            block_size=bs, sent_unix_ms=now_ms())
                elif ch.kind == "blocks":
                    for msg in _block_messages(ch, chunk):
                        msg.block_size, msg.sent_unix_ms = bs, now_ms()
                        yield msg
        finally:
            self.fanout.unsubscribe(sub)
