"""ReplicaIndex: applying WatchPlacement events and longest-prefix lookup."""

from __future__ import annotations

from kvroute.v1 import registry_pb2
from router_service.replica_index import ReplicaIndex

PE = registry_pb2.PlacementEvent


def upsert(nid: str, model: str = "m") -> registry_pb2.PlacementEvent:
    return PE(kind=PE.NODE_UPSERT, node_id=nid, block_size=16,
              node=registry_pb2.NodeInfo(node_id=nid, address=f"{nid}:1", model=model,
                                         healthy=True, queue_depth=2))


def test_events_build_the_index_and_lookup_finds_longest_prefix() -> None:
    ix = ReplicaIndex()
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
