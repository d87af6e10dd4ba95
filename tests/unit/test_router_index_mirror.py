"""IndexMirror: applying WatchPlacement events and longest-prefix lookup."""

from __future__ import annotations

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
