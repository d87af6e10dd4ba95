"""``dynamo``: NVIDIA Dynamo's KV router cost (``DefaultWorkerSelector``).

Source: github.com/ai-dynamo/dynamo, ``lib/llm/src/kv_router/scheduler.rs``
(``impl WorkerSelector for DefaultWorkerSelector``), defaults from ``KvRouterConfig``
(``overlap_score_weight`` 1.0, ``router_temperature`` 0). Per worker it computes the logit

    overlap_score_weight * prefill_tokens / block_size + decode_blocks

where ``prefill_tokens`` is the prefill still queued on the worker (its own active-sequence
tracker: uncached tokens of routed requests whose prefill has not completed) plus this request's
uncached tokens, and ``decode_blocks`` is the number of distinct blocks across the worker's active
requests together with this request. Lowest logit wins (temperature 0); ties go to the worker with
the smaller cache tree (``used_blocks`` here), then to a seeded random pick (Dynamo: HashMap
order). Overlap comes from the engines' KV events (``NodeView.matched_blocks``, Dynamo's default
``use_kv_events``). PEERS.md records that this formula matched 1,500 of Dynamo 1.6.1's decisions.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from router_service.policies.base import Candidate, Decision, NodeView, RequestView, healthy_nodes


@dataclass(slots=True)
class _Active:
    node_id: str
    blocks: tuple[int, ...]
    prefill_tokens: int
    prefilling: bool = True


class DynamoPolicy:
    """Dynamo's KV-router cost with its own active-sequence tracking."""

    name = "dynamo"

    def __init__(self, overlap_score_weight: float = 1.0, seed: int = 0) -> None:
        self.overlap_score_weight = overlap_score_weight
        self._rng = random.Random(seed)
        self._active: dict[str, _Active] = {}
        self._blocks: dict[str, Counter[int]] = {}
        self._prefill: dict[str, int] = {}
        self._last: tuple[str, int] | None = None

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """Lowest ``w * prefill_blocks + decode_blocks`` (module docstring)."""
        live = healthy_nodes(nodes)
        bs = request.block_size
        hashes = request.block_hashes
        scored: list[tuple[float, int, NodeView, int]] = []
        for v in live:
            cached = min(v.matched_blocks * bs, request.prompt_tokens)
            uncached = request.prompt_tokens - cached
            prefill_tokens = self._prefill.get(v.node_id, 0) + uncached
            active = self._blocks.get(v.node_id)
            if active:
                decode_blocks = len(active) + sum(1 for h in hashes if h not in active)
            else:
                decode_blocks = len(hashes)
            logit = self.overlap_score_weight * prefill_tokens / bs + decode_blocks
            scored.append((logit, v.used_blocks, v, uncached))
        best = min(s[0] for s in scored)
        tied = [s for s in scored if s[0] == best]
        small = min(s[1] for s in tied)
        tied = [s for s in tied if s[1] == small]
        logit, _, node, uncached = tied[self._rng.randrange(len(tied))] if len(tied) > 1 \
            else tied[0]
        self._last = (request.request_id, uncached)
        cands = tuple(Candidate(s[2].node_id, s[0], s[2].matched_blocks, s[2].load)
                      for s in sorted(scored, key=lambda s: s[0]))
        return Decision(node.node_id, node.matched_blocks,
                        f"dynamo: logit {logit:.1f} (prefill + decode blocks)", cands)

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Add the request to the chosen worker's active sequences."""
        node_id = decision.node_id
        uncached = self._last[1] if self._last and self._last[0] == request.request_id \
            else request.prompt_tokens
        act = _Active(node_id, tuple(request.block_hashes), uncached)
        self._active[request.request_id] = act
        self._blocks.setdefault(node_id, Counter()).update(act.blocks)
        self._prefill[node_id] = self._prefill.get(node_id, 0) + uncached

    def on_prefill_done(self, request_id: str) -> None:
        """``mark_prefill_complete``: the request's prefill tokens leave the worker's load."""
        act = self._active.get(request_id)
        if act is not None and act.prefilling:
            act.prefilling = False
            self._prefill[act.node_id] -= act.prefill_tokens

    def on_complete(self, request_id: str) -> None:
        """``free``: the request's blocks leave the worker's active set."""
        act = self._active.pop(request_id, None)
        if act is None:
            return
        if act.prefilling:
            self._prefill[act.node_id] -= act.prefill_tokens
        c = self._blocks[act.node_id]
        c.subtract(act.blocks)
        for h in act.blocks:
            if c.get(h, 0) <= 0:
                c.pop(h, None)
