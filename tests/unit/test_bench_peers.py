"""Peer re-implementations and the seed policy follow their published rules."""

from __future__ import annotations

from bench.peer_policies.dynamo import DynamoPolicy
from bench.peer_policies.llmd import LlmdPolicy
from bench.peer_policies.sglang import SglangCacheAwarePolicy
from bench.peer_policies.vllm_pd import VllmPdCacheAwarePolicy
from bench.seed_policy import SeedPolicy
from router_service.policies.base import Decision, NodeView, RequestView, choose_and_commit


def _n(i: int, matched: int = 0, inflight: int = 0, queue: int = 0, used: int = 0) -> NodeView:
    return NodeView(f"n{i}", f"a{i}", matched, inflight, queue, 0, used, 100, 0.0)


def _r(rid: str, hashes: tuple[int, ...], bs: int = 16) -> RequestView:
    return RequestView(rid, hashes, len(hashes) * bs, bs)


def test_dynamo_cost_counts_queued_prefill_and_active_blocks() -> None:
    p = DynamoPolicy()
    r1 = _r("a", (1, 2, 3, 4))
    d = choose_and_commit(p, r1, [_n(0, matched=4), _n(1)])
    assert d.node_id == "n0"  # no prefill at all there (commit added its active blocks)
    # n0 now holds 4 active blocks; a request with nothing cached anywhere goes to n1
    r2 = _r("b", (9, 8))
    d2 = choose_and_commit(p, r2, [_n(0), _n(1)])
    assert d2.node_id == "n1"
    p.on_prefill_done("b")
    p.on_complete("b")
    p.on_complete("a")
    assert not any(p._blocks.values()) and all(v == 0 for v in p._prefill.values())


def test_sglang_prefers_its_own_tree_then_smallest_tree_then_balance() -> None:
    p = SglangCacheAwarePolicy()
    nodes = [_n(0), _n(1)]
    first = choose_and_commit(p, _r("a", (1, 2, 3, 4)), nodes)
    # same prefix: match rate 3/4 > 0.3 -> the same worker, whatever the engines report
    again = choose_and_commit(p, _r("b", (1, 2, 3, 5)), nodes)
    assert again.node_id == first.node_id
    # an unrelated prompt goes to the smaller tree
    other = choose_and_commit(p, _r("c", (7, 8)), nodes)
    assert other.node_id != first.node_id
    # imbalance (max - min > 64 and max > 1.5 min) -> least loaded, even with a match
    busy = [_n(0, inflight=100) if first.node_id == "n0" else _n(0),
            _n(1, inflight=100) if first.node_id == "n1" else _n(1)]
    assert choose_and_commit(p, _r("d", (1, 2, 3, 4)), busy).node_id != first.node_id


def test_vllm_pd_least_loaded_of_the_best_matches_else_least_loaded() -> None:
    p = VllmPdCacheAwarePolicy()
    # nothing matches: the least-loaded worker, the first of equal loads (min_by_key)
    assert choose_and_commit(p, _r("a", (1, 2, 3, 4)), [_n(0), _n(1)]).node_id == "n0"
    assert choose_and_commit(p, _r("b", (7, 8)), [_n(0, inflight=2), _n(1)]).node_id == "n1"
    # match 3/4 > 0.3 on n0's tree only: n0, however busy (short of the imbalance thresholds)
    assert choose_and_commit(p, _r("c", (1, 2, 3, 5)),
                             [_n(0, inflight=9), _n(1)]).node_id == "n0"
    # the same best match on two trees: the less loaded of the two, not the last owner
    p.commit(_r("d", (1, 2, 9)), Decision("n1", 0, "sent there"))
    assert choose_and_commit(p, _r("e", (1, 2, 6)),
                             [_n(0, inflight=3), _n(1, inflight=1), _n(2)]).node_id == "n1"
    assert choose_and_commit(p, _r("e2", (1, 2, 10)),
                             [_n(0, inflight=1), _n(1, inflight=3), _n(2)]).node_id == "n0"
    # a match at or under 0.3 counts for nothing: least loaded ("f" matches 1 block of 4)
    assert choose_and_commit(p, _r("f", (1, 5, 6, 7)),
                             [_n(0), _n(1, inflight=1), _n(2, inflight=1)]).node_id == "n0"
    assert choose_and_commit(p, _r("g", (1, 11, 12, 13)),
                             [_n(0, inflight=2), _n(1), _n(2)]).node_id == "n1"
    # imbalance (max - min > 64 and max > 1.5 min): least loaded, even with a full match
    assert choose_and_commit(p, _r("h", (1, 2, 3, 4)),
                             [_n(0, inflight=100), _n(1, inflight=30), _n(2, inflight=20)]
                             ).node_id == "n2"


def test_llmd_weighs_prefix_queue_and_usage() -> None:
    p = LlmdPolicy()
    nodes = [_n(0, matched=4, queue=5, used=100), _n(1, matched=0, queue=0, used=0)]
    # prefix 3*1.0 + queue 0 + kv 0 = 3.0 vs prefix 0 + queue 2 + kv 2 = 4.0
    assert choose_and_commit(p, _r("a", (1, 2, 3, 4)), nodes).node_id == "n1"
    nodes = [_n(0, matched=4, queue=1, used=50), _n(1, matched=0, queue=0, used=60)]
    assert choose_and_commit(p, _r("b", (1, 2, 3, 4)), nodes).node_id == "n0"


def test_seed_policy_keys_on_first_50_characters() -> None:
    p = SeedPolicy()
    nodes = [_n(0, used=10), _n(1, used=5)]
    p.on_prompt_text("a", "x" * 50 + "tail one")
    # new key -> least cache in use
    assert choose_and_commit(p, _r("a", (1,)), nodes).node_id == "n1"
    p.on_prompt_text("b", "x" * 50 + "something else entirely")
    nodes = [_n(0, used=0), _n(1, used=99)]
    assert choose_and_commit(p, _r("b", (2,)), nodes).node_id == "n1"  # same 50 chars -> same node
