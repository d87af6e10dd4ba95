"""IndexMirror: applying WatchPlacement events and longest-prefix lookup."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.v1 import registry_pb2
from router_service.index_mirror import IndexMirror

PE = registry_pb2.PlacementEvent


def upsert(nid: str, model: str = "m") -> registry_pb2.PlacementEvent:
    return PE(kind=PE.NODE_UPSERT, node_id=nid, block_size=16,
              node=registry_pb2.NodeInfo(node_id=nid, address=f"{nid}:1", model=model,
                                         healthy=True, queue_depth=2))


def test_events_build_the_index_and_lookup_finds_longest_prefix() -> None:
    ix = IndexMirror()
    for ev in (upsert("a"), upsert("b"), upsert("c", model="other"),
               PE(kind=PE.BLOCKS, node_id="a", stored=[1, 2, 3]),
               PE(kind=PE.BLOCKS, node_id="b", stored=[1, 2, 3, 4, 5]),
               PE(kind=PE.SNAPSHOT_END)):
        ix.apply(ev)
    assert ix.complete and ix.block_size == 16
    got = {n.node_id: m for n, m in ix.lookup([1, 2, 3, 4, 9], "m")}
    assert got == {"a": 3, "b": 4}
    ix.apply(PE(kind=PE.BLOCKS, node_id="b", removed=[2]))
    assert {n.node_id: m for n, m in ix.lookup([1, 2, 3], "m")} == {"a": 3, "b": 1}
    ix.apply(PE(kind=PE.BLOCKS, node_id="a", cleared=True, stored=[7]))
    assert {n.node_id: m for n, m in ix.lookup([1, 2], "m")}["a"] == 0
    ix.apply(PE(kind=PE.NODE_REMOVED, node_id="b"))
    assert [n.node_id for n, _ in ix.lookup([1], "m")] == ["a"]
    assert ix.models() == {"m", "other"}


def test_status_updates_in_place_and_membership_changes() -> None:
    ix = IndexMirror()
    ix.apply(upsert("a"))
    ix.apply(PE(kind=PE.BLOCKS, node_id="a", stored=[1, 2]))
    (node, m), = ix.lookup([1, 2], "m")
    assert m == 2 and node.queue_depth == 2
    ix.apply(PE(kind=PE.NODE_UPSERT, node_id="a", node=registry_pb2.NodeInfo(
        node_id="a", address="a:1", model="m", healthy=False, queue_depth=9)))
    (again, m), = ix.lookup([1, 2], "m")
    assert again is node and again.queue_depth == 9 and not again.healthy and m == 2
    ix.apply(upsert("a", model="other"))  # moved to another model: blocks stay its own
    assert ix.lookup([1, 2], "m") == []
    assert [(n.node_id, m) for n, m in ix.lookup([1, 2], "other")] == [("a", 2)]
    ix.apply(PE(kind=PE.BLOCKS, node_id="ghost", stored=[1]))  # never upserted: ignored
    assert ix.blocks_of("ghost") == 0 and ix.blocks_of("a") == 2
    ix.apply(PE(kind=PE.NODE_REMOVED, node_id="a"))
    ix.apply(upsert("b"))  # reuses a's slot: none of a's blocks
    assert [(n.node_id, m) for n, m in ix.lookup([1, 2], "m")] == [("b", 0)]
    assert ix.models() == {"m"}


def test_lookup_among_many_nodes_reports_every_node_of_the_model() -> None:
    ix = IndexMirror()
    for i in range(300):
        ix.apply(upsert(f"n{i}", model="m" if i % 3 else "x"))
        ix.apply(PE(kind=PE.BLOCKS, node_id=f"n{i}", stored=list(range(i % 7))))
    got = {n.node_id: m for n, m in ix.lookup(list(range(10)), "m")}
    assert len(got) == 200
    assert got == {f"n{i}": i % 7 for i in range(300) if i % 3}


def test_matches_lists_only_nodes_holding_a_prefix() -> None:
    ix = IndexMirror()
    for nid, blocks in (("a", [1, 2, 3]), ("b", [1]), ("c", [7])):
        ix.apply(upsert(nid))
        ix.apply(PE(kind=PE.BLOCKS, node_id=nid, stored=blocks))
    ix.apply(upsert("d", model="other"))
    ix.apply(PE(kind=PE.BLOCKS, node_id="d", stored=[1, 2]))
    assert ix.matches([1, 2, 3], "m") == {"a": 3, "b": 1}
    assert ix.matches([1, 2], "other") == {"d": 2}
    assert ix.matches([], "m") == {} and ix.matches([1], "nope") == {}
    got = {n.node_id: m for n, m in ix.lookup([1, 2, 3], "m") if m}
    assert got == ix.matches([1, 2, 3], "m")

_events = st.lists(st.one_of(
    st.tuples(st.just("upsert"), st.sampled_from("abcdef"), st.sampled_from(["m", "x"])),
    st.tuples(st.just("remove"), st.sampled_from("abcdef"), st.just("")),
    st.tuples(st.just("blocks"), st.sampled_from("abcdef"),
              st.tuples(st.booleans(), st.lists(st.integers(0, 9), max_size=5),
                        st.lists(st.integers(0, 9), max_size=5))),
), max_size=40)


@settings(max_examples=80, deadline=None)
@given(events=_events, query=st.lists(st.integers(0, 9), max_size=8))
def test_lookup_equals_a_naive_model_under_any_event_order(
        events: list[tuple[str, str, object]], query: list[int]) -> None:
    ix = IndexMirror()
    model: dict[str, str] = {}
    held: dict[str, set[int]] = {}
    for kind, nid, arg in events:
        if kind == "upsert":
            assert isinstance(arg, str)
            ix.apply(upsert(nid, model=arg))
            model[nid] = arg
            held.setdefault(nid, set())
        elif kind == "remove":
            ix.apply(PE(kind=PE.NODE_REMOVED, node_id=nid))
            model.pop(nid, None)
            held.pop(nid, None)
        else:
            cleared, removed, stored = arg  # type: ignore[misc]
            ix.apply(PE(kind=PE.BLOCKS, node_id=nid, cleared=cleared, removed=removed,
                        stored=stored))
            if nid in held:  # blocks of an unknown node are ignored
                if cleared:
                    held[nid].clear()
                held[nid].difference_update(removed)
                held[nid].update(stored)
    for m in ("m", "x"):
        expect = {}
        for nid, mm in model.items():
            if mm == m:
                n = 0
                while n < len(query) and query[n] in held[nid]:
                    n += 1
                expect[nid] = n
        got = {n.node_id: k for n, k in ix.lookup(query, m)}
        assert got == expect
        assert ix.matches(query, m) == {nid: k for nid, k in expect.items() if k}
        assert all(ix.blocks_of(nid) == len(held[nid]) for nid in model)
