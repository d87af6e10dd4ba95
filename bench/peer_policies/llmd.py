"""``llmd``: llm-d inference scheduler's default weighted scorers with the max-score picker.

Sources: github.com/kubernetes-sigs/gateway-api-inference-extension,
``pkg/epp/scheduling/framework/plugins/scorer/queue.go`` (QueueScorer),
``pkg/epp/scheduling/framework/plugins/scorer/kvcache_utilization.go``
(KVCacheUtilizationScorer), ``pkg/epp/scheduling/framework/plugins/multi/prefix/plugin.go``
(prefix-cache-scorer) and ``picker/max_score_picker.go``; weights from llm-d's default
scheduling profile (``queue-scorer`` 2, ``kv-cache-utilization-scorer`` 2,
``prefix-cache-scorer`` 3).

Scores in [0, 1], higher is better, summed with the weights:

* prefix: matched prefix blocks / request blocks. Overlap comes from the engines' KV events
  (``NodeView.matched_blocks``) — llm-d's *precise* prefix-cache mode; the default approximate
  scorer would only know what it routed.
* queue: ``(max_q - q) / (max_q - min_q)`` over the engines' waiting-queue sizes, 1.0 when all
  equal.
* kv-cache utilisation: ``1 - usage``.

The highest total wins; ties are broken at random (seeded).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router_service.policies.base import Candidate, Decision, NodeView, RequestView, healthy_nodes


class LlmdPolicy:
    """llm-d weighted prefix/queue/KV-usage scorers (module docstring)."""

    name = "llmd"

    def __init__(self, prefix_weight: float = 3.0, queue_weight: float = 2.0,
                 kv_weight: float = 2.0, seed: int = 0) -> None:
        self.prefix_weight = prefix_weight
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight
        self._rng = random.Random(seed)

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """Maximum weighted score (module docstring)."""
        live = healthy_nodes(nodes)
        total_blocks = len(request.block_hashes)
        qs = [v.queue_depth for v in live]
        qmax, qmin = max(qs), min(qs)
        scored: list[tuple[float, NodeView]] = []
        for v in live:
            prefix = v.matched_blocks / total_blocks if total_blocks else 0.0
            queue = 1.0 if qmax == qmin else (qmax - v.queue_depth) / (qmax - qmin)
            kv = 1.0 - min(1.0, v.usage)
            scored.append((self.prefix_weight * prefix + self.queue_weight * queue
                           + self.kv_weight * kv, v))
        best = max(s[0] for s in scored)
        tied = [s[1] for s in scored if s[0] == best]
        node = tied[self._rng.randrange(len(tied))] if len(tied) > 1 else tied[0]
        cands = tuple(Candidate(v.node_id, sc, v.matched_blocks, v.load)
                      for sc, v in sorted(scored, key=lambda s: -s[0]))
        return Decision(node.node_id, node.matched_blocks, f"llmd: score {best:.2f}", cands)

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Stateless between decisions: nothing to record."""
