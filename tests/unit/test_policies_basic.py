"""round_robin, least_loaded and random: choices, ties, and never an unhealthy node."""

from __future__ import annotations

import pytest

from router_service.policies.base import NodeView, NoEligibleNode, RequestView, choose_and_commit
from router_service.policies.factory import PolicySet, build_policy
from router_service.policies.least_loaded import LeastLoadedPolicy
from router_service.policies.random_choice import RandomPolicy
from router_service.policies.round_robin import RoundRobinPolicy

REQ = RequestView("r1", [1, 2, 3], 48, 16)


def node(nid: str, inflight: int = 0, queue: int = 0, healthy: bool = True,
         matched: int = 0) -> NodeView:
    return NodeView(nid, f"{nid}:1", matched, inflight, queue, 0, 0, 100, 0.0, 0.0, healthy)


def test_round_robin_cycles_healthy_nodes_in_id_order() -> None:
    p = RoundRobinPolicy()
    nodes = [node("c"), node("a"), node("b", healthy=False)]
    assert [choose_and_commit(p, REQ, nodes).node_id for _ in range(4)] == ["a", "c", "a", "c"]


def test_least_loaded_orders_by_inflight_then_queue_then_id() -> None:
    p = LeastLoadedPolicy()
    d = choose_and_commit(p, REQ, [node("a", 2), node("b", 1, 5), node("c", 1, 3)])
    assert d.node_id == "c"
    assert choose_and_commit(LeastLoadedPolicy(), REQ,
                             [node("b", 1, 3), node("a", 1, 3)]).node_id == "a"
    d = choose_and_commit(p, REQ, [node("a", 0, healthy=False), node("b", 4)])
    assert d.node_id == "b" and "least loaded" in d.reason


def test_least_loaded_ties_take_turns() -> None:
    """Requests that never overlap (every count 0) spread evenly, not all on one node id."""
    p = LeastLoadedPolicy()
    nodes = [node("c"), node("a"), node("b"), node("d", 1)]
    picks = [choose_and_commit(p, REQ, nodes).node_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    d = p.choose(REQ, nodes)
    assert d.candidates[0].node_id == d.node_id and "3 tied" in d.reason
    assert p.choose(REQ, nodes).node_id == d.node_id  # choose alone does not move the turn


def test_degraded_least_loaded_ignores_stale_queue_depths() -> None:
    p = LeastLoadedPolicy(use_queue_depth=False)
    nodes = [node("a", 0, 9), node("b", 0, 0), node("c", 1, 0)]
    picks = [choose_and_commit(p, REQ, nodes).node_id for _ in range(100)]
    assert picks.count("a") == picks.count("b") == 50 and "queue" not in p.choose(
        REQ, nodes).reason


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "random", "session",
                                  "kv_aware"])
def test_every_policy_refuses_when_no_node_is_healthy(name: str) -> None:
    p = build_policy(name)
    with pytest.raises(NoEligibleNode):
        choose_and_commit(p, REQ, [node("a", healthy=False)])
    for _ in range(20):
        assert choose_and_commit(p, REQ, [node("a", healthy=False), node("b")]).node_id == "b"


def test_random_is_seeded_and_uses_every_healthy_node() -> None:
    nodes = [node("a"), node("b"), node("c")]
    picks = [choose_and_commit(RandomPolicy(), REQ, nodes).node_id for _ in range(3)]
    again = [choose_and_commit(RandomPolicy(), REQ, nodes).node_id for _ in range(3)]
    assert picks == again
    p = RandomPolicy()
    assert {choose_and_commit(p, REQ, nodes).node_id for _ in range(200)} == {"a", "b", "c"}


def test_registry_names_and_unknown_policy() -> None:
    ps = PolicySet()
    assert ps.names == ["kv_aware", "least_loaded", "random", "round_robin", "session"]
    with pytest.raises(KeyError, match="known"):
        build_policy("nope")
