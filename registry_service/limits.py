"""Checks that run before a write touches the index: write tokens and block limits.

- **Write token.** RegisterNode returns a random token; the node record keeps only its SHA-256.
  Heartbeat, Resync and DeregisterNode must carry the token of the current epoch. Readers see
  the epoch (ListNodes, WatchNodes), never the token, so they cannot keep a dead node alive.
- **Block limits.** A node may have at most ``settings.node_block_limit(capacity)`` blocks
  indexed (its capacity plus slack, never more than ``--max-blocks-per-node``), and the whole
  index at most ``--max-index-entries`` (block, node) entries. A heartbeat or resync that would
  pass either is refused with RESOURCE_EXHAUSTED naming the node, the limit and the count,
  and nothing is applied. The common case costs O(1): only when the worst case (every stored
  hash new) would pass the limit is the exact result computed. The offloaded (lower) tier is
  not bounded by the node's GPU capacity (offloading stores are larger): a node may hold at
  most ``--max-blocks-per-node`` offloaded blocks, and they count in ``--max-index-entries``.
"""

from __future__ import annotations

import hmac
import secrets

import numpy as np

from kvroute.errors import FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted
from kvroute.index import OFFLOADED
from kvroute.v1 import registry_pb2 as pb
from registry_service import validate
from registry_service.auth import token_digest
from registry_service.metrics import RegistryMetrics
from registry_service.nodes import LiveNode
from registry_service.peek import peek_async
from registry_service.security_settings import SecuritySettings
from registry_service.settings import RegistrySettings
from registry_service.store.base import NodeRecord, as_hashes
from registry_service.view import ReplicaView


def new_write_token() -> tuple[str, str]:
    """A fresh write token and its SHA-256 digest (the record keeps only the digest)."""
    token = secrets.token_urlsafe(32)
    return token, token_digest(token)


def check_write_token(rec: NodeRecord, token: str, method: str,
                      metrics: RegistryMetrics) -> None:
    """PERMISSION_DENIED unless ``token`` is the write token of the record's registration."""
    if not rec.token_sha256:  # registered by a registry without write tokens (upgrade)
        return
    if token and hmac.compare_digest(token_digest(token), rec.token_sha256):
        return
    metrics.refused.labels(method, "write_token").inc()
    what = "carries no write_token" if not token else "carries a write_token that does not match"
    raise PermissionDenied(
        f"{method} for node {rec.node_id} epoch {rec.epoch} {what} the one RegisterNode "
        "returned for this epoch: only the agent that registered the node may write it "
        "(an agent that lost its token registers again)")


def check_capacity(s: SecuritySettings, capacity_blocks: int, node_id: str) -> None:
    """FAILED_PRECONDITION when a node announces more capacity than any node may index."""
    if capacity_blocks > s.max_blocks_per_node:
        raise FailedPrecondition(
            f"node {node_id}: capacity_blocks {capacity_blocks} is over this registry's "
            f"--max-blocks-per-node {s.max_blocks_per_node}; raise that limit (index memory "
            "is ~81 B per block) or register a smaller capacity")


def _refuse(s: SecuritySettings, metrics: RegistryMetrics, method: str, state: LiveNode,
            count: int, limit: int, what: str) -> ResourceExhausted:
    cap = state.capacity()
    metrics.refused.labels(method, "node_capacity").inc()
    return ResourceExhausted(
        f"{method} for node {state.node_id} refused: {what} {count} blocks, over its limit of "
        f"{limit} (capacity_blocks {cap} plus slack: --capacity-slack {s.capacity_slack:g}, "
        f"--capacity-slack-blocks {s.capacity_slack_blocks}, at most --max-blocks-per-node "
        f"{s.max_blocks_per_node}); nothing was applied. Send only blocks the engine holds")


def _index_full(s: SecuritySettings, metrics: RegistryMetrics, method: str, node_id: str,
                total: int) -> ResourceExhausted:
    metrics.refused.labels(method, "index_full").inc()
    return ResourceExhausted(
        f"{method} for node {node_id} refused: the index would hold {total} (block, node) "
        f"entries, over --max-index-entries {s.max_index_entries}; nothing was applied "
        "(raise the limit with the registry's memory, or add registry capacity)")


def _node_entries(view: ReplicaView, state: LiveNode) -> int:
    return view.index.count(state.slot) + view.index.count(state.slot, OFFLOADED)


def check_delta(s: SecuritySettings, metrics: RegistryMetrics, view: ReplicaView,
                state: LiveNode, req: pb.HeartbeatRequest) -> None:
    """RESOURCE_EXHAUSTED when applying this heartbeat delta would pass a block limit."""
    cleared = req.cleared
    limit = s.node_block_limit(state.capacity())
    off_limit = s.max_blocks_per_node
    now, now_off = view.index.count(state.slot), view.index.count(state.slot, OFFLOADED)
    others = view.index.entries - now - now_off
    upper = (0 if cleared else now) + len(req.stored)
    upper_off = (0 if cleared else now_off) + len(req.stored_offloaded)
    if upper <= limit and upper_off <= off_limit and \
            others + upper + upper_off <= s.max_index_entries:
        return
    if len(req.stored) > limit:  # cannot fit whatever it removes: refuse without set work
        raise _refuse(s, metrics, "Heartbeat", state, len(req.stored), limit,
                      "its stored list alone carries")
    after = after_off = 0
    for tier, stored, removed in ((0, req.stored, req.removed),
                                  (OFFLOADED, req.stored_offloaded, req.removed_offloaded)):
        base = np.zeros(0, dtype=np.uint64) if cleared else view.index.blocks(state.slot, tier)
        n = int(np.union1d(np.setdiff1d(base, as_hashes(removed)), as_hashes(stored)).size)
        if tier:
            after_off = n
        else:
            after = n
    if after > limit:
        raise _refuse(s, metrics, "Heartbeat", state, after, limit, "it would index")
    if after_off > off_limit:
        raise _refuse(s, metrics, "Heartbeat", state, after_off, off_limit,
                      "its offloaded tier would hold")
    if others + after + after_off > s.max_index_entries:
        raise _index_full(s, metrics, "Heartbeat", state.node_id, others + after + after_off)


def check_heartbeat(s: SecuritySettings, metrics: RegistryMetrics, view: ReplicaView,
                    state: LiveNode, req: pb.HeartbeatRequest) -> None:
    """Everything a heartbeat of the current epoch must pass before it touches anything:
    its write token, a sane capacity, and (for the next delta) the block limits."""
    rec = state.record
    check_write_token(rec, req.write_token, "Heartbeat", metrics)
    if req.capacity_blocks:
        check_capacity(s, req.capacity_blocks, rec.node_id)
    if validate.has_delta(req) and req.delta_seq == state.applied_seq + 1:
        check_delta(s, metrics, view, state, req)


def resync_limit(s: SecuritySettings, state: LiveNode) -> int:
    """Most hashes a Resync of this node may carry."""
    return s.node_block_limit(state.capacity())


def check_resync_total(s: SecuritySettings, metrics: RegistryMetrics, view: ReplicaView,
                       state: LiveNode, sent: int, sent_offloaded: int = 0) -> None:
    """RESOURCE_EXHAUSTED when a Resync stream carries too many hashes (checked per message)."""
    limit = resync_limit(s, state)
    if sent > limit:
        raise _refuse(s, metrics, "Resync", state, sent, limit, "the stream carries at least")
    if sent_offloaded > s.max_blocks_per_node:
        raise _refuse(s, metrics, "Resync", state, sent_offloaded, s.max_blocks_per_node,
                      "the stream's offloaded tier carries at least")


def check_resync_index(s: SecuritySettings, metrics: RegistryMetrics, view: ReplicaView,
                       state: LiveNode, unique: int) -> None:
    """RESOURCE_EXHAUSTED when the resynced set would overfill the whole index."""
    total = view.index.entries - _node_entries(view, state) + unique
    if total > s.max_index_entries:
        raise _index_full(s, metrics, "Resync", state.node_id, total)


class WritePrecheck:
    """Refuses an oversized write from its raw bytes, before it is decoded (see ``peek.py``).

    Same rules and messages as the checks after decoding (which still run): a heartbeat whose
    stored list alone passes its node's block limit, or more hashes than
    ``--max-hashes-per-call``; a Resync message carrying more hashes than the node may hold.
    """

    def __init__(self, settings: RegistrySettings, metrics: RegistryMetrics,
                 view: ReplicaView) -> None:
        self.settings, self.metrics, self.view = settings, metrics, view

    def _unknown(self, node_id: str, nbytes: int) -> None:
        """NOT_FOUND for a large write to a node this replica does not know: decoding it only
        to learn that from etcd is the most expensive refusal a rogue could buy. (A node
        registered through another replica moments ago is read from etcd on its next small
        write; a large one is told to register again.)"""
        if nbytes > UNKNOWN_NODE_MAX_BYTES:
            raise NotFound(f"node {node_id} is not registered here (never, or its lease "
                           "expired): resync required: call RegisterNode, then Resync")

    async def __call__(self, method: str, raw: bytes) -> None:
        if method == "Heartbeat":
            found = await peek_async(raw, _HEARTBEAT_PACKED)
            if found is None:
                return
            stored, removed = found.counts.get(7, 0), found.counts.get(8, 0)
            validate.hash_count(stored + removed, "stored+removed", self.settings)
            validate.hash_count(found.counts.get(16, 0) + found.counts.get(17, 0),
                                "stored_offloaded+removed_offloaded", self.settings)
            state = self.view.nodes.get(found.node_id)
            if state is None:
                self._unknown(found.node_id, len(raw))
            else:
                limit = self.settings.node_block_limit(state.capacity())
                if stored > limit:
                    raise _refuse(self.settings, self.metrics, method, state, stored, limit,
                                  "its stored list alone carries")
        elif method == "Resync":
            found = await peek_async(raw, _RESYNC_PACKED)
            if found is None:
                return
            n = found.counts.get(3, 0)
            validate.hash_count(n, "block_hashes", self.settings)
            validate.hash_count(found.counts.get(5, 0), "offloaded_block_hashes", self.settings)
            state = self.view.nodes.get(found.node_id)
            if state is None:
                self._unknown(found.node_id, len(raw))
            else:
                check_resync_total(self.settings, self.metrics, self.view, state, n)


UNKNOWN_NODE_MAX_BYTES = 1 << 20
"""Writes larger than this for a node the replica does not know are refused undecoded."""
_HEARTBEAT_PACKED = frozenset({7, 8, 16, 17})
"""HeartbeatRequest.stored, .removed, .stored_offloaded, .removed_offloaded."""
_RESYNC_PACKED = frozenset({3, 5})
"""ResyncRequest.block_hashes, .offloaded_block_hashes."""
