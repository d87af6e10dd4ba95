"""``session``: session affinity by consistent hashing with bounded loads.

The key is the request's session id; without one, a prompt-prefix key (the canonical hash of the
first ``session_prefix_blocks`` blocks, which names that whole prefix), so requests sharing an
opening stick together too. Keys map onto a hash ring with ``session_virtual_nodes`` points per
node; adding a node to N moves only about 1/(N+1) of the keys. The bound (Mirrokni et al.,
"Consistent Hashing with Bounded Loads"): a node may take the request only while its load + 1 is
at most ``ceil(c * (total load + 1) / nodes)``; otherwise the walk continues clockwise. So a key
shared by every request (a common system prompt) fills its node up to the cap and spills over
instead of piling up. Load = router-counted in-flight requests + reported queue depth.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from xxhash import xxh3_64_intdigest

from kvroute.settings import require, setting
from router_service.policies.base import Candidate, Decision, NodeView, RequestView, healthy_nodes

_SEED = 0x5E55_10A0


@dataclass(frozen=True)
class SessionSettings:
    """Settings of the ``session`` policy."""

    session_load_factor: float = setting(
        1.25, "Bounded-load factor c of the session policy: a node takes a request only while "
              "its load + 1 <= ceil(c * (total load + 1) / nodes); must be >= 1")
    session_virtual_nodes: int = setting(
        160, "Points per node on the session policy's hash ring (more = evener split)")
    session_prefix_blocks: int = setting(
        4, "Without a session id, the session policy keys on the hash of this many leading "
           "prompt blocks (fewer if the prompt is shorter)")

    def __post_init__(self) -> None:
        require(self.session_load_factor >= 1.0, "session_load_factor", "must be >= 1")
        require(1 <= self.session_virtual_nodes <= 10_000, "session_virtual_nodes",
                "must be in 1..10000")
        require(self.session_prefix_blocks >= 1, "session_prefix_blocks", "must be >= 1")


class HashRing:
    """A consistent-hash ring over node ids with virtual nodes."""

    def __init__(self, node_ids: Sequence[str], virtual_nodes: int) -> None:
        points = sorted((xxh3_64_intdigest(f"{nid}#{i}".encode(), _SEED), nid)
                        for nid in node_ids for i in range(virtual_nodes))
        self._hashes = [p[0] for p in points]
        self._owners = [p[1] for p in points]
        self._distinct = len(set(node_ids))

    def walk(self, key_hash: int) -> list[str]:
        """Distinct node ids clockwise from ``key_hash`` (the owner first)."""
        out: list[str] = []
        seen: set[str] = set()
        n = len(self._owners)
        start = bisect.bisect_left(self._hashes, key_hash)
        for k in range(n):
            nid = self._owners[(start + k) % n]
            if nid not in seen:
                seen.add(nid)
                out.append(nid)
                if len(out) == self._distinct:
                    break
        return out


def session_key(request: RequestView, prefix_blocks: int) -> tuple[int, str]:
    """(hash of the affinity key, what the key is) for a request."""
    if request.session_key:
        return xxh3_64_intdigest(request.session_key.encode(), _SEED), "session"
    if request.block_hashes:
        k = min(prefix_blocks, len(request.block_hashes))
        return (xxh3_64_intdigest(request.block_hashes[k - 1].to_bytes(8, "little"), _SEED),
                f"prefix of {k} blocks")
    return xxh3_64_intdigest(request.request_id.encode(), _SEED), "request id (short prompt)"


class SessionPolicy:
    """Sticky routing by consistent hashing with bounded loads (see module docstring)."""

    name = "session"

    def __init__(self, settings: SessionSettings | None = None) -> None:
        self.settings = settings or SessionSettings()
        self._ring_nodes: tuple[str, ...] = ()
        self._ring = HashRing((), 1)

    def _ring_for(self, node_ids: tuple[str, ...]) -> HashRing:
        if node_ids != self._ring_nodes:
            self._ring = HashRing(node_ids, self.settings.session_virtual_nodes)
            self._ring_nodes = node_ids
        return self._ring

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """The first node clockwise from the key whose load is under the bound."""
        ok = {n.node_id: n for n in healthy_nodes(nodes)}
        ring = self._ring_for(tuple(sorted(ok)))
        key_hash, what = session_key(request, self.settings.session_prefix_blocks)
        total = sum(n.load for n in ok.values())
        cap = max(1, math.ceil(self.settings.session_load_factor * (total + 1) / len(ok)))
        cands: list[Candidate] = []
        for i, nid in enumerate(ring.walk(key_hash)):
            n = ok[nid]
            if n.load + 1 > cap:
                cands.append(Candidate(nid, float(i), n.matched_blocks, n.load,
                                       excluded=f"over load cap {cap}"))
                continue
            cands.insert(0, Candidate(nid, float(i), n.matched_blocks, n.load))
            moved = f", {i} node(s) over the load cap {cap} skipped" if i else ""
            return Decision(node_id=nid, matched_blocks=n.matched_blocks,
                            reason=f"session affinity on {what}: ring owner{moved} "
                                   f"(load {n.load}, cap {cap})",
                            candidates=tuple(cands))
        # Unreachable with c >= 1 (some node is always under the bound); keep a safe answer.
        best = min(ok.values(), key=lambda n: (n.load, n.node_id))
        return Decision(node_id=best.node_id, matched_blocks=best.matched_blocks,
                        reason=f"session: every node over cap {cap}; least loaded",
                        candidates=tuple(cands))

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Stateless between decisions: nothing to record."""
