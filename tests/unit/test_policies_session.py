"""session: sticks, moves about 1/(N+1) of sessions when a node joins, bounded loads."""

from __future__ import annotations

import math

from router_service.policies.base import NodeView, RequestView
from router_service.policies.session import SessionPolicy, SessionSettings


def nodes(n: int, loads: dict[str, int] | None = None) -> list[NodeView]:
    loads = loads or {}
    return [NodeView(f"n{i}", f"n{i}:1", 0, loads.get(f"n{i}", 0), 0, 0, 0, 100, 0.0)
            for i in range(n)]


def req(session: str | None, blocks: list[int] | None = None, rid: str = "r") -> RequestView:
    return RequestView(rid, blocks or [], 16 * len(blocks or []), 16, session)


def test_a_session_sticks_to_its_node() -> None:
    p = SessionPolicy()
    fleet = nodes(5)
    first = p.choose(req("user-42"), fleet).node_id
    assert all(p.choose(req("user-42", rid=f"r{i}"), fleet).node_id == first for i in range(50))
    d = p.choose(req("user-42"), fleet)
    assert "session affinity on session" in d.reason


def test_adding_a_node_moves_about_one_in_n_plus_one_sessions() -> None:
    p = SessionPolicy()
    n = 8
    sessions = [f"s{i}" for i in range(4000)]
    before = {s: p.choose(req(s), nodes(n)).node_id for s in sessions}
    after = {s: p.choose(req(s), nodes(n + 1)).node_id for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(after[s] == f"n{n}" for s in moved), "only moves onto the new node"
    assert len(moved) / len(sessions) <= 1.3 / (n + 1)
    assert len(moved) / len(sessions) >= 0.5 / (n + 1)


def test_prefix_shared_by_every_request_never_pushes_a_node_past_its_cap() -> None:
    c = 1.25
    p = SessionPolicy(SessionSettings(session_load_factor=c))
    n = 4
    loads: dict[str, int] = {}
    shared = [111, 222, 333, 444, 555]  # every request opens with the same blocks, no session
    for i in range(400):
        fleet = nodes(n, loads)
        total = sum(loads.values())
        cap = max(1, math.ceil(c * (total + 1) / n))
        d = p.choose(req(None, [*shared, i], rid=f"r{i}"), fleet)
        loads[d.node_id] = loads.get(d.node_id, 0) + 1
        assert loads[d.node_id] <= cap
    assert max(loads.values()) <= math.ceil(c * 400 / n)
    assert len(loads) == n


def test_prefix_key_groups_requests_without_a_session() -> None:
    p = SessionPolicy(SessionSettings(session_prefix_blocks=2))
    fleet = nodes(6)
    a = p.choose(req(None, [1, 2, 3, 4], rid="a"), fleet)
    b = p.choose(req(None, [1, 2, 9, 9], rid="b"), fleet)
    assert a.node_id == b.node_id and "prefix of 2 blocks" in a.reason
