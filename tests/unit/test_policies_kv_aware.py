"""kv_aware: load cap against a shared prefix, longest prefix wins at equal load, health."""

from __future__ import annotations

import dataclasses

import pytest

from kvroute.errors import ConfigError
from router_service.policies.base import (
    NodeView,
    NoEligibleNode,
    RequestView,
    choose_and_commit,
)
from router_service.policies.kv_aware import KvAwarePolicy, KvAwareSettings


def _node(i: int, matched: int = 0, inflight: int = 0, pending: float = 0.0,
          healthy: bool = True) -> NodeView:
    return NodeView(node_id=f"n{i}", address=f"127.0.0.1:{9000 + i}", matched_blocks=matched,
                    inflight=inflight, queue_depth=0, running=0, used_blocks=0,
                    capacity_blocks=1000, eviction_rate=0.0, pending_prefill_tokens=pending,
                    healthy=healthy)


def _req(blocks: int = 8, bs: int = 16, first: int = 0) -> RequestView:
    return RequestView("r", list(range(first, first + blocks)), blocks * bs, bs)


def test_shared_prefix_never_pushes_a_node_past_its_cap() -> None:
    s = KvAwareSettings()
    pol = KvAwarePolicy(s)
    inflight = [0] * 4
    for _ in range(400):
        # node 0 holds the whole prompt and the others nothing; nothing ever completes
        nodes = [_node(i, matched=8 if i == 0 else 0, inflight=inflight[i]) for i in range(4)]
        d = choose_and_commit(pol, _req(), nodes)
        k = int(d.node_id[1:])
        mean = (sum(inflight) + 1) / 4
        assert inflight[k] + 1 <= s.kv_load_cap_factor * mean + s.kv_load_cap_slack
        inflight[k] += 1
    assert max(inflight) / (sum(inflight) / 4) <= s.kv_load_cap_factor + 0.05
    assert inflight[0] == max(inflight)


def test_longest_prefix_wins_when_loads_are_equal() -> None:
    pol = KvAwarePolicy()
    nodes = [_node(0, matched=2, inflight=3), _node(1, matched=6, inflight=3),
             _node(2, matched=4, inflight=3)]
    d = choose_and_commit(pol, _req(), nodes)
    assert d.node_id == "n1" and d.matched_blocks == 6
    assert d.candidates[0].node_id == "n1"


def test_queued_prefill_outweighs_a_small_overlap() -> None:
    pol = KvAwarePolicy(KvAwareSettings(kv_prefill_tokens_per_s=1000.0))
    nodes = [_node(0, matched=1, pending=50_000.0), _node(1, matched=0)]
    assert choose_and_commit(pol, _req(), nodes).node_id == "n1"


def test_unhealthy_never_chosen() -> None:
    pol = KvAwarePolicy()
    nodes = [_node(0, matched=8, healthy=False), _node(1, inflight=5), _node(2, inflight=9)]
    for _ in range(20):
        assert choose_and_commit(pol, _req(), nodes).node_id != "n0"
    with pytest.raises(NoEligibleNode):
        choose_and_commit(pol, _req(), [_node(0, healthy=False)])


def test_equal_idle_nodes_share_work() -> None:
    pol = KvAwarePolicy()
    chosen = {choose_and_commit(pol, _req(first=100 * k), [_node(i) for i in range(4)]).node_id
              for k in range(8)}
    assert len(chosen) == 4


def test_prefix_routed_but_not_yet_reported_follows_its_node() -> None:
    pol = KvAwarePolicy()
    idle = [_node(i) for i in range(4)]
    first = choose_and_commit(pol, _req(blocks=8), idle)
    # the registry does not know the blocks yet (prefill still queued): the follow-up turn,
    # which extends the same prefix, still goes where the prefix was sent
    follow = choose_and_commit(pol, _req(blocks=12), idle)
    assert follow.node_id == first.node_id
    assert "routed there, not yet reported" in follow.reason
    off = KvAwarePolicy(KvAwareSettings(kv_recent_routes=0))
    a = choose_and_commit(off, _req(blocks=8), idle)
    # rotates without memory
    assert choose_and_commit(off, _req(blocks=12), idle).node_id != a.node_id


def test_an_unconfirmed_route_does_not_hold_a_prefix_forever() -> None:
    """A prompt sent to n0 whose blocks the engine never reports (aborted before prefill,
    events lost) while the registry says n1 holds it: routing it to n0 again does not renew
    the belief, so once ``kv_recent_routes`` decisions have passed it follows the registry."""
    pol = KvAwarePolicy(KvAwareSettings(kv_recent_routes=4))
    idle = [_node(i) for i in range(2)]
    assert choose_and_commit(pol, _req(), idle).node_id == "n0"  # nothing known yet
    other = _req(first=500)
    held = [_node(0), _node(1, matched=7)]  # the registry: n1 holds 7 of the 8 blocks
    seen = []
    for _ in range(6):
        seen.append(choose_and_commit(pol, _req(), held).node_id)
        choose_and_commit(pol, other, idle)
    # the unreported route (8 blocks) beats n1's reported 7 for a while, then the registry wins
    assert seen[0] == "n0"
    assert seen[-2:] == ["n1", "n1"], seen


def test_settings_validate() -> None:
    with pytest.raises(ConfigError, match="kv-load-cap-factor"):
        KvAwareSettings(kv_load_cap_factor=0.5)


def test_reported_queue_floors_a_drained_estimate() -> None:
    pol = KvAwarePolicy(KvAwareSettings(kv_prefill_tokens_per_s=1000.0, kv_recent_routes=0))
    idle = [_node(i) for i in range(2)]
    for k in range(50):  # learn the typical uncached prefill (128 tokens here)
        choose_and_commit(pol, _req(first=1000 * k), idle)

    def q(i: int, depth: int, matched: int = 0) -> NodeView:
        return NodeView(f"n{i}", "a", matched, 0, depth, 0, 0, 100, 0.0)

    # the router's estimate says both are idle (drained too early); node 0 reports 40 waiting
    # requests: its small overlap no longer wins
    assert choose_and_commit(pol, _req(), [q(0, 40, matched=2), q(1, 0)]).node_id == "n1"
    assert choose_and_commit(pol, _req(first=77), [q(0, 0, matched=2), q(1, 0)]).node_id == "n0"


def test_replicas_take_different_slots_of_one_plan_on_equal_nodes() -> None:
    """Four replicas with the same view, deciding the same instant, spread over four nodes
    instead of all taking the best one (issue 19's herding)."""
    nodes = [_node(i, pending=100.0 * i) for i in range(6)]
    picks = set()
    for rank in range(4):
        pol = KvAwarePolicy()
        req = dataclasses.replace(_req(), replicas=4, replica_rank=rank)
        d = choose_and_commit(pol, req, nodes)
        assert "slot" in d.reason
        picks.add(d.node_id)
    assert picks == {"n0", "n1", "n2", "n3"}
    single = KvAwarePolicy()
    assert choose_and_commit(single, _req(), nodes).node_id == "n0"  # one router: the best


def test_replicas_all_keep_a_far_better_cached_prefix() -> None:
    nodes = [_node(0, matched=56)] + [_node(i) for i in range(1, 4)]
    for rank in range(4):
        req = dataclasses.replace(_req(blocks=64), replicas=4, replica_rank=rank)
        assert choose_and_commit(KvAwarePolicy(), req, nodes).node_id == "n0"


def test_replica_spread_zero_always_takes_the_best() -> None:
    nodes = [_node(i, pending=100.0 * i) for i in range(4)]
    req = dataclasses.replace(_req(), replicas=4, replica_rank=3)
    pol = KvAwarePolicy(KvAwareSettings(kv_replica_spread=0.0))
    assert choose_and_commit(pol, req, nodes).node_id == "n0"


def _pnode(i: int, matched: int = 0, inflight: int = 0, pending: float = 0.0,
           role: str = "prefill") -> NodeView:
    return dataclasses.replace(_node(i, matched, inflight, pending), role=role)


def test_a_saturated_prefill_only_fleet_weighs_reuse_by_its_backlog() -> None:
    # 128-token prompt, 96 cached on n0 behind 1.2 s of queued prefill, nothing on n1 (idle
    # queue); every prefill node has 10 requests in flight. Aggregated scoring (weight 8):
    # n0 1200 + 8 x 32 = 1456 against n1 8 x 128 = 1024 tokens -> n1 recomputes the prefix.
    # Prefill-only: each recomputed token also delays the ~10 requests that queue behind it,
    # weight 8 + 10 = 18 (backlog factor 1): n0 1200 + 18 x 32 = 1776 against n1 18 x 128 =
    # 2304 -> n0.
    s = KvAwareSettings(kv_prefill_tokens_per_s=1000.0, kv_prefill_only_backlog_factor=1.0)
    for role, want in (("both", "n1"), ("prefill", "n0")):
        nodes = [_pnode(0, matched=6, inflight=10, pending=1200.0, role=role),
                 _pnode(1, inflight=10, role=role)]
        d = choose_and_commit(KvAwarePolicy(s), _req(), nodes)
        assert d.node_id == want, role
    off = dataclasses.replace(s, kv_prefill_only_backlog=False)
    nodes = [_pnode(0, matched=6, inflight=10, pending=1200.0), _pnode(1, inflight=10)]
    assert choose_and_commit(KvAwarePolicy(off), _req(), nodes).node_id == "n1"
    d = choose_and_commit(KvAwarePolicy(s), _req(), nodes)
    assert "reuse weight 18.0 with the prefill backlog" in d.reason


def test_the_backlog_factor_scales_the_prefill_only_backlog() -> None:
    # 96 of 128 tokens cached on n0 behind 2.0 s of queued prefill, 10 in flight everywhere.
    # Factor 1: weight 8 + 10 = 18, n0 2000 + 18 x 32 = 2576 > n1 18 x 128 = 2304 -> n1.
    # Factor 2: weight 8 + 20 = 28, n0 2000 + 28 x 32 = 2896 < n1 28 x 128 = 3584 -> n0.
    s = KvAwareSettings(kv_prefill_tokens_per_s=1000.0, kv_prefill_only_backlog_factor=1.0)
    nodes = [_pnode(0, matched=6, inflight=10, pending=2000.0), _pnode(1, inflight=10)]
    assert choose_and_commit(KvAwarePolicy(s), _req(), nodes).node_id == "n1"
    two = dataclasses.replace(s, kv_prefill_only_backlog_factor=2.0)
    d = choose_and_commit(KvAwarePolicy(two), _req(), nodes)
    assert d.node_id == "n0" and "reuse weight 28.0 with the prefill backlog" in d.reason
    assert KvAwareSettings().kv_prefill_only_backlog_factor == 2.0  # the default
    with pytest.raises(ValueError):
        KvAwareSettings(kv_prefill_only_backlog_factor=-1.0)


def test_an_idle_prefill_only_fleet_scores_as_before_without_decode_charges() -> None:
    # no backlog: the weight stays kv_reuse_weight; in-flight requests are the prefill queue
    # (priced by pending prefill), so they add no decode-occupancy charge on prefill-only nodes
    s = KvAwareSettings(kv_prefill_tokens_per_s=1000.0, kv_prefill_only_backlog_factor=1.0)
    pol = KvAwarePolicy(s)
    nodes = [_pnode(0, matched=2), _pnode(1)]
    cyc = pol.cycle(_req(), nodes)
    assert pol.prefill.backlog(cyc) == 0.0
    assert pol.prefill.scores(cyc) == pytest.approx([8 * 96 / 1000, 8 * 128 / 1000])
    busy = [_pnode(0, inflight=3), _pnode(1, inflight=3, role="both")]
    cyc = pol.cycle(_req(), busy)
    assert pol.prefill.backlog(cyc) == 3.0  # prefill-only candidates only
    got = pol.prefill.scores(cyc)
    assert got[0] == pytest.approx((8 + 3) * 128 / 1000)
    assert got[1] == pytest.approx((8 * 128 + 1000 * 3) / 1000)  # a 'both' node: as before


def test_the_load_cap_spares_prefill_only_nodes_unless_asked() -> None:
    # n0 holds the prompt and is far over the request-count cap; its queue in seconds is short
    nodes = [_pnode(0, matched=8, inflight=30, pending=100.0)] + [_pnode(i) for i in (1, 2, 3)]
    assert choose_and_commit(KvAwarePolicy(), _req(), nodes).node_id == "n0"
    capped = KvAwarePolicy(KvAwareSettings(kv_prefill_only_load_cap=True))
    assert choose_and_commit(capped, _req(), nodes).node_id != "n0"
    both = [dataclasses.replace(v, role="both") for v in nodes]
    assert choose_and_commit(KvAwarePolicy(), _req(), both).node_id != "n0"


def test_idle_prefill_only_nodes_take_new_prompts_by_what_they_have_computed() -> None:
    # three idle prefill-only nodes and prompts none of them holds: ties go to the node that
    # has computed the fewest tokens (not in turn), so new KV fills every cache at one pace
    pol = KvAwarePolicy()
    nodes = [_pnode(i) for i in range(3)]
    sizes = [8, 1, 1, 8, 1, 1]  # blocks: a long prompt, then short ones
    got = [choose_and_commit(pol, _req(blocks=b, first=100 * k), nodes).node_id
           for k, b in enumerate(sizes)]
    # n0 128 tokens, n1 16, n2 16 -> n1 takes the next long one, then n2, n2 (16 < 144)
    assert got == ["n0", "n1", "n2", "n1", "n2", "n2"]
    assert pol.prefill._written == {"n0": 128.0, "n1": 144.0, "n2": 48.0}
    # a node that joins now starts level with the least of the others, not at 0
    joined = [*nodes, _pnode(3)]
    assert pol.prefill.written_all(pol.cycle(_req(first=900), joined))[3] == 48.0
    choose_and_commit(pol, _req(blocks=1, first=950), joined)
    assert pol.prefill._written["n3"] >= 48.0
    # 'both' nodes and the switch turned off keep the rotating start
    turns = ["n0", "n1", "n2", "n0", "n1", "n2"]
    both = [dataclasses.replace(v, role="both") for v in nodes]
    pol = KvAwarePolicy()
    assert [choose_and_commit(pol, _req(blocks=b, first=100 * k), both).node_id
            for k, b in enumerate(sizes)] == turns
    assert pol.prefill._written == {}
    off = KvAwarePolicy(KvAwareSettings(kv_prefill_only_even_inflow=False))
    assert [choose_and_commit(off, _req(blocks=b, first=100 * k), nodes).node_id
            for k, b in enumerate(sizes)] == turns


def test_float_residue_of_a_drained_estimate_is_a_tie_on_prefill_only_nodes() -> None:
    pol = KvAwarePolicy()
    assert choose_and_commit(pol, _req(), [_pnode(0), _pnode(1)]).node_id == "n0"
    # n1's drained queued-prefill estimate left a residue (1e-6 tokens = ~6e-11 s): still a
    # tie, and n1 has computed less
    nodes = [_pnode(0), _pnode(1, pending=1e-6)]
    assert choose_and_commit(pol, _req(first=50), nodes).node_id == "n1"
    # a real difference (a queued 1,000 tokens) is not a tie
    pol = KvAwarePolicy()
    choose_and_commit(pol, _req(), [_pnode(0), _pnode(1)])
    nodes = [_pnode(0), _pnode(1, pending=1000.0)]
    assert choose_and_commit(pol, _req(first=50), nodes).node_id == "n0"
