"""Where a disaggregated sim run loses prefill hits and decode-side holds (JSON lines on stdout).

    python scripts/pd_losses.py [--workload mooncake-sample] [--strategies kv_aware/kv_aware,...]
        [--seeds 20] [--arrival-jitter-s 2.7] [--heartbeat-delay-s 1.0] [--prefill-nodes 6]
        [--decode-nodes 2] [--window-s 20]

Replays ``kvroute bench --mode sim --prefill-nodes P --decode-nodes D`` (the same
:func:`bench.sim.pd_replay.simulate_pd`, seeds 0..N-1 under the given timing) and watches it:
when a request reaches its prefill engine, the longest prefix any prefill engine *actually*
holds (``reachable``, blocks beyond block 0) against the one the chosen engine holds; a
request sent off the engine holding more is an off-best loss, by the kv_aware decision's
reason for that engine: ``cap`` (excluded by the load cap), ``believed`` (the router's view
held less) or ``score`` (its estimate, queue against overlap, was higher). On the decode side:
of the requests sharing more than block 0 with an earlier request (its follow-up), how many
were handed over within ``--window-s`` of that request's hand-over, and the prompt blocks the
decode engines already held beyond block 0. The decode choice itself, per request: whether
some decode node held more than block 0 of the prompt — as the router believed at the
decision (``decode_believed_*``: the registry's view plus blocks in transit), in the decode
engines' actual caches at the decision (``decode_actual_*``) and at the hand-over
(``decode_handover_*``) — and whether the chosen node was (one of) those holding the most
(``*_chose_best``); ``decode_off_best_handover_blocks`` sums the blocks beyond block 0 the best
decode engine held at the hand-over and the chosen one did not; of the blocks the chosen
node was believed to hold at the decision, ``decode_stale_view_blocks`` counts those it no
longer held even then (the view was stale), and ``decode_evicted_before_handover_blocks`` the
blocks it did hold at the decision and had evicted by the hand-over. One JSON line per
strategy: means over the seeds.
An analysis tool for issue 18 (README, "Disaggregated prefill/decode"), not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from typing import Any

from bench.pd_bench import pd_metrics
from bench.policies import build_policy
from bench.runner import resolve_settings
from bench.sim.config import SimSettings
from bench.sim.pd_replay import simulate_pd
from bench.workloads import load_workload
from engine_sim.fleet import SimFleet
from engine_sim.model import SimRequest
from engine_sim.params import transfer_s_per_block
from router_service.core import RouterCore
from router_service.disagg import DisaggSettings
from router_service.domain import RouteDecision, RouteRequest
from router_service.policies.kv_aware import KvAwareSettings


def _follow_ups(blocks: list[list[int]]) -> dict[int, int]:
    """Request index -> the latest earlier request it shares more than block 0 with."""
    out: dict[int, int] = {}
    for j, b in enumerate(blocks):
        for i in range(j - 1, max(-1, j - 400), -1):
            a = blocks[i]
            if len(a) > 1 and len(b) > 1 and a[0] == b[0] and a[1] == b[1]:
                out[j] = i
                break
    return out


def _decode_choice(c: Counter[str], d: RouteDecision, decode_ids: list[str],
                   actual: list[int], handover: tuple[int, list[int]] | None) -> None:
    """Count what the decode node of ``d`` held against the other decode nodes (docstring)."""
    if not d.decode_node_id:
        return
    chosen = decode_ids.index(d.decode_node_id)
    believed = {x.node_id: x.matched_blocks for x in d.decode_candidates}
    views = [("believed", [believed.get(n, 0) for n in decode_ids], chosen),
             ("actual", actual, chosen)]
    if handover is not None:
        views.append(("handover", handover[1], handover[0]))
    for name, held, k in views:
        if max(held) > 1:
            c[f"decode_{name}_beyond_block0"] += 1
            c[f"decode_{name}_chose_best"] += held[k] == max(held)
    if handover is not None:
        k, held = handover
        c["decode_off_best_handover_blocks"] += max(0, max(held) - 1) - max(0, held[k] - 1)
        at_decision = actual[chosen]
        c["decode_stale_view_blocks"] += max(0, believed.get(d.decode_node_id, 0) - at_decision)
        c["decode_evicted_before_handover_blocks"] += max(0, at_decision - held[k])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mooncake-sample")
    p.add_argument("--strategies", default="kv_aware/kv_aware,sglang/least_loaded,"
                                            "round_robin/round_robin")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--arrival-jitter-s", type=float, default=2.7)
    p.add_argument("--heartbeat-delay-s", type=float, default=1.0)
    p.add_argument("--prefill-nodes", type=int, default=6)
    p.add_argument("--decode-nodes", type=int, default=2)
    p.add_argument("--window-s", type=float, default=20.0)
    args = p.parse_args()
    w = load_workload(workload=args.workload)
    pn, dn = args.prefill_nodes, args.decode_nodes
    s = resolve_settings(w, SimSettings(nodes=pn + dn, arrival_jitter_s=args.arrival_jitter_s,
                                        heartbeat_delay_s=args.heartbeat_delay_s))
    bs = s.block_size or w.block_size
    xfer = transfer_s_per_block("seed", bs)
    rate = s.prefill_tokens_per_s
    reqs = w.requests
    follow = _follow_ups([list(r.block_hashes) for r in reqs])
    at_arrival: dict[str, tuple[int, list[int]]] = {}
    dec_at_decision: dict[str, list[int]] = {}
    dec_at_handover: dict[str, tuple[int, list[int]]] = {}
    handed: dict[str, float] = {}
    decisions: dict[str, RouteDecision] = {}
    submit, decide = SimFleet.submit, RouterCore.decide_local

    def watch_submit(fleet: SimFleet, i: int, req: SimRequest, now: float) -> list[SimRequest]:
        if req.remote_kv:
            handed[req.request_id] = now
            dec_at_handover[req.request_id] = (
                i - pn, [n.cache.leading_cached(req.block_hashes) for n in fleet.nodes[pn:]])
        else:
            at_arrival[req.request_id] = (i, [n.cache.leading_cached(req.block_hashes)
                                              for n in fleet.nodes[:pn]])
            dec_at_decision[req.request_id] = [n.cache.leading_cached(req.block_hashes)
                                               for n in fleet.nodes[pn:]]
        return submit(fleet, i, req, now)

    def watch_decide(core: RouterCore, req: RouteRequest) -> RouteDecision:
        d = decide(core, req)
        decisions[req.request_id] = d
        return d

    SimFleet.submit = watch_submit  # type: ignore[method-assign,assignment]
    RouterCore.decide_local = watch_decide  # type: ignore[method-assign,assignment]
    kv = KvAwareSettings(kv_prefill_tokens_per_s=rate)
    for strat in args.strategies.split(","):
        pre, _, dec = strat.partition("/")
        per_seed: list[Counter[str]] = []
        for seed in range(args.seeds):
            at_arrival.clear()
            dec_at_decision.clear()
            dec_at_handover.clear()
            handed.clear()
            decisions.clear()
            policy = build_policy(pre, prefill_tokens_per_s=rate, seed=seed,
                                  overrides={KvAwareSettings: kv})
            pd = simulate_pd(w, policy, s, pn, dn, xfer, DisaggSettings(pd_decode_policy=dec),
                             None, rate, seed=seed)
            m = pd_metrics(pd)
            c: Counter[str] = Counter()
            for j, r in enumerate(reqs):
                chosen, held = at_arrival[r.request_id]
                best = max(held)
                c["reachable"] += max(0, best - 1)
                lost = max(0, best - 1) - max(0, held[chosen] - 1)  # beyond block 0
                if lost > 0:
                    cand = {x.node_id: x for x in decisions[r.request_id].candidates}
                    b = cand.get(pd.run.node_ids[held.index(best)])
                    why = ("cap" if b is not None and b.excluded else
                           "believed" if b is not None and b.matched_blocks < best else "score")
                    c[f"off_best_{why}"] += lost
                blocks = -(-r.prompt_tokens // bs)
                c["decode_held_beyond_block0"] += max(0, blocks - pd.transfer_blocks[j] - 1)
                _decode_choice(c, decisions[r.request_id], pd.run.node_ids[pn:],
                               dec_at_decision[r.request_id],
                               dec_at_handover.get(r.request_id))
                if j in follow:
                    prev = reqs[follow[j]].request_id
                    if handed[r.request_id] - handed[prev] < args.window_s:
                        c["follow_ups_handed_within_window"] += 1
            c["follow_ups"] = len(follow)
            per_seed.append(c)
            c["hit"] = m["hit_rate_tokens"]
            c["p90_s"] = m["ttft_ms"]["p90"] / 1000
            c["transferred_blocks"] = m["transferred_blocks"]
        keys = sorted({k for c in per_seed for k in c})
        out: dict[str, Any] = {"strategy": strat, "seeds": args.seeds,
                               "arrival_jitter_s": args.arrival_jitter_s,
                               "heartbeat_delay_s": args.heartbeat_delay_s}
        out.update({k: round(statistics.mean(c.get(k, 0) for c in per_seed), 4) for k in keys})
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
