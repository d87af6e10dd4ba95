"""``sglang``: sglang-router's ``cache_aware`` policy.

Source: github.com/sgl-project/sglang, ``sgl-router/src/policies/cache_aware.rs``
(``CacheAwarePolicy::select_worker``); defaults of sglang-router 0.3.x (PEERS.md):
``cache_threshold`` 0.3, ``balance_abs_threshold`` 64, ``balance_rel_threshold`` 1.5.

1. Loads are the router's own in-flight request counts per worker. If
   ``max - min > balance_abs_threshold`` and ``max > balance_rel_threshold * min`` the system is
   imbalanced: pick the least-loaded worker.
2. Otherwise find the worker whose approximate tree has the longest prefix match with the
   request; if ``matched / prompt > cache_threshold`` pick it, else pick the worker with the
   smallest tree.
3. Either way, insert the request into the chosen worker's tree.

The tree is sglang's *approximate* radix tree: it records what the router sent to each worker
and never hears about engine evictions (it trims itself to ``max_tree_size`` every 60 s of wall
clock, which at its default size does not trigger on these traces, so it is not modelled). The
real router matches raw text characters; here the tree holds the prompt's canonical blocks and
sizes are counted in tokens — the same prefix structure at block granularity.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.peer_policies.cache_aware import CacheAwareThresholds, matched_blocks
from router_service.policies.base import Decision, NodeView, RequestView, healthy_nodes


class SglangCacheAwarePolicy:
    """sglang-router cache_aware (module docstring)."""

    name = "sglang"

    def __init__(self, thresholds: CacheAwareThresholds | None = None) -> None:
        self.thresholds = thresholds or CacheAwareThresholds()
        self._trees: dict[str, set[int]] = {}
        self._size: dict[str, int] = {}
        self._last_owner: dict[int, str] = {}

    def _match(self, node_id: str, hashes: Sequence[int]) -> int:
        return matched_blocks(self._trees.get(node_id), hashes)

    def _insert(self, node_id: str, request: RequestView) -> None:
        tree = self._trees.setdefault(node_id, set())
        added = 0
        for i, h in enumerate(request.block_hashes):
            if h not in tree:
                tree.add(h)
                added += max(0, min(request.block_size,
                                    request.prompt_tokens - i * request.block_size))
            self._last_owner[h] = node_id
        self._size[node_id] = self._size.get(node_id, 0) + added

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """Balance check, then longest prefix over the threshold, else smallest tree."""
        live = healthy_nodes(nodes)
        imbalanced, hi, lo = self.thresholds.imbalanced([v.inflight for v in live])
        if imbalanced:
            node = min(live, key=lambda v: v.inflight)
            return Decision(node.node_id, node.matched_blocks,
                            f"sglang: imbalanced (max {hi}, min {lo}); shortest queue")
        matches = {v.node_id: self._match(v.node_id, request.block_hashes) for v in live}
        best_len = max(matches.values())
        by_id = {v.node_id: v for v in live}
        chosen: NodeView | None = None
        if best_len:
            owner = self._last_owner.get(request.block_hashes[best_len - 1])
            tied = [nid for nid, m in matches.items() if m == best_len]
            chosen = by_id[owner] if owner in tied else by_id[tied[0]]
        bs = request.block_size
        rate = min(best_len * bs, request.prompt_tokens) / max(1, request.prompt_tokens)
        cut = self.thresholds.cache_threshold
        if chosen is not None and rate > cut:
            why = f"sglang: prefix match {rate:.2f} > {cut}"
        else:
            chosen = min(live, key=lambda v: self._size.get(v.node_id, 0))
            why = f"sglang: match {rate:.2f} <= {cut}; smallest tree"
        return Decision(chosen.node_id, chosen.matched_blocks, why)

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Insert the request's prefix into the chosen node's tree."""
        self._insert(decision.node_id, request)
