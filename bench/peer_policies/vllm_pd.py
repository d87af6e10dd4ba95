"""``vllm_pd``: vllm-router 0.1.17's ``cache_aware`` prefill choice in its PD mode.

What ``vllm-router --vllm-pd-disaggregation --prefill-policy cache_aware`` does to pick the
prefill engine, read from the 0.1.17 source distribution on PyPI (``vllm_router-0.1.17.tar.gz``):
``src/routers/http/pd_router.rs`` (``select_pd_pair`` → ``select_stage``) hands the prefill pool
to ``src/policies/cache_aware.rs`` (``CacheAwarePolicy::prepare_selection`` then
``select_prepared``); defaults from ``src/main.rs``: ``--cache-threshold`` 0.3,
``--balance-abs-threshold`` 64, ``--balance-rel-threshold`` 1.5.

1. A worker's load is its PD *prefill occupancy* (``PdLoadSample::occupancy``): requests the
   router admitted to it whose prefill has not answered yet (``finish_prefill`` releases it at
   the hand-over), kvroute's ``NodeView.inflight`` on a prefill-only node.
2. If ``max - min > 64`` and ``max > 1.5 * min`` over those loads, prefix matching is off.
3. Otherwise each worker's match rate is the prefix of the request's token ids found in *that
   worker's* part of the router's approximate tree (token ids encoded as 8 hex characters each,
   matched per tenant, counted in whole tokens), over the prompt's tokens. If the best rate is
   above 0.3 the candidates are the workers with exactly that rate; else every worker.
4. Among the candidates the **least-loaded** worker wins; equal loads go to the first in
   ``--prefill`` order (Rust's ``min_by_key``).
5. The prompt is inserted into the chosen worker's tree, whichever branch chose it.

Three differences from sglang-router's ``cache_aware`` (:mod:`bench.peer_policies.sglang`), which
this bench used for "prefix-first" before: a low match goes to the least-loaded worker (sglang:
the smallest tree), a tied best match goes to the least-loaded of the tied workers (sglang: the
last worker the matched prefix was sent to), and matching is per worker (sglang walks one
shared tree). The tree records what the router sent and never hears of engine evictions; its
size cap (``--max-tree-size`` 2^25 characters per worker, trimmed every 120 s of wall clock)
is not reached on the traces here, so it is not modelled. The engines' prompts are synthesized
so that two prompts share exactly their common canonical blocks' tokens
(:func:`bench.prompts.synth_tokens`), so matching blocks here equals matching token ids there.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.peer_policies.cache_aware import CacheAwareThresholds, matched_blocks
from router_service.policies.base import Decision, NodeView, RequestView, healthy_nodes


class VllmPdCacheAwarePolicy:
    """vllm-router 0.1.17 PD-mode ``cache_aware`` prefill selection (module docstring)."""

    name = "vllm_pd"

    def __init__(self, thresholds: CacheAwareThresholds | None = None) -> None:
        self.thresholds = thresholds or CacheAwareThresholds()
        self._trees: dict[str, set[int]] = {}

    def _matched_tokens(self, node_id: str, request: RequestView) -> int:
        k = matched_blocks(self._trees.get(node_id), request.block_hashes)
        return min(k * request.block_size, request.prompt_tokens)

    def choose(self, request: RequestView, nodes: Sequence[NodeView]) -> Decision:
        """Balance check, then the least-loaded of the best matches above the threshold, else
        the least-loaded worker."""
        live = healthy_nodes(nodes)
        loads = [v.inflight for v in live]
        imbalanced, hi, lo = self.thresholds.imbalanced(loads)
        prompt = max(1, request.prompt_tokens)
        rates = [self._matched_tokens(v.node_id, request) / prompt for v in live]
        best = max(rates)
        cut = self.thresholds.cache_threshold
        use_prefix = not imbalanced and best > cut
        pool = [i for i in range(len(live)) if not use_prefix or rates[i] == best]
        pick = min(pool, key=lambda i: loads[i])  # first of equal loads, as min_by_key
        node = live[pick]
        if imbalanced:
            why = f"vllm_pd: imbalanced (max {hi}, min {lo}); least loaded"
        elif use_prefix:
            why = f"vllm_pd: prefix match {best:.2f} > {cut}; least loaded of {len(pool)} with it"
        else:
            why = f"vllm_pd: match {best:.2f} <= {cut}; least loaded"
        return Decision(node.node_id, node.matched_blocks, why)

    def commit(self, request: RequestView, decision: Decision) -> None:
        """Insert the prompt into the chosen worker's tree."""
        self._trees.setdefault(decision.node_id, set()).update(request.block_hashes)
