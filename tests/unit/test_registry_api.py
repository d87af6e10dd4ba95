"""Registry RPCs over real gRPC on loopback (in-process server, memory store): behaviour,
validation and status codes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kvroute.blocks import HASH_SCHEME
from kvroute.procs import free_port
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from registry_service.server import serve
from registry_service.settings import RegistrySettings

Code = grpc.StatusCode


@dataclass
class Reg:
    stub: pb_grpc.RegistryStub
    settings: RegistrySettings


@pytest.fixture
async def reg(tmp_path: Path) -> AsyncIterator[Reg]:
    ready = tmp_path / "ready.json"
    settings = RegistrySettings(
        store="memory", listen=f"127.0.0.1:{free_port()}", ready_file=str(ready),
        lease_ttl_s=30, max_nodes=3, max_hashes_per_call=1000, status_write_interval_s=0,
        snapshot_threshold=3)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    for _ in range(200):
        if ready.exists():
            break
        await asyncio.sleep(0.02)
    port = json.loads(ready.read_text())["grpc_port"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield Reg(pb_grpc.RegistryStub(ch), settings)
    stop.set()
    assert await task == 0


async def register(r: Reg, node: str = "n1", address: str = "10.0.0.1:8000",
                   **kw: object) -> pb.RegisterNodeResponse:
    req = pb.RegisterNodeRequest(node_id=node, address=address, model="m", block_size=16,
                                 capacity_blocks=1000, hash_scheme=HASH_SCHEME)
    for k, v in kw.items():
        setattr(req, k, v)
    return await r.stub.RegisterNode(req)


async def code_of(aw: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await aw  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


async def lookup(r: Reg, hashes: list[int]) -> dict[str, int]:
    resp = await r.stub.Lookup(pb.LookupRequest(block_hashes=hashes, model="m"))
    return {n.node_id: n.matched_blocks for n in resp.nodes}


async def test_register_heartbeat_lookup(reg: Reg) -> None:
    a = await register(reg, "a")
    b = await register(reg, "b", "10.0.0.2:8000")
    assert a.block_size == 16 and a.lease_ttl_s == 30 and a.heartbeat_interval_s == 10
    await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, used_blocks=4,
                                                 stored=[1, 2, 3, 4], delta_seq=1))
    await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="b", epoch=b.epoch,
        write_token=b.write_token, stored=[1, 2, 9],
                                                 delta_seq=1))
    assert await lookup(reg, [1, 2, 3, 5]) == {"a": 3, "b": 2}
    assert await lookup(reg, [7]) == {"a": 0, "b": 0}
    # cleared, then removed, then stored
    await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, cleared=True,
                                                 used_blocks=4, stored=[1, 8], removed=[1],
                                                 delta_seq=2))
    assert await lookup(reg, [1, 8]) == {"a": 2, "b": 1}
    nodes = (await reg.stub.ListNodes(pb.ListNodesRequest())).nodes
    assert [n.node_id for n in nodes] == ["a", "b"]
    assert nodes[0].blocks_indexed == 2 and nodes[0].used_blocks == 4 and nodes[0].healthy
    assert 29 <= nodes[0].lease_remaining_s <= 30


async def test_delta_seq_duplicate_gap_and_snapshots(reg: Reg) -> None:
    a = await register(reg, "a")
    hb = pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=[1], delta_seq=1)
    assert not (await reg.stub.Heartbeat(hb)).resync_required
    hb2 = pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=[1], removed=[1], delta_seq=1)
    assert not (await reg.stub.Heartbeat(hb2)).resync_required  # repeat: ack, not re-applied
    assert await lookup(reg, [1]) == {"a": 1}
    gap = await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=[2],
                                                       delta_seq=5))
    assert gap.resync_required and "delta_seq 5" in gap.reason
    for seq in range(2, 9):  # past snapshot_threshold=3: compacted, still the same answer
        await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token,
                                                     stored=[seq], delta_seq=seq))
    assert await lookup(reg, list(range(1, 10))) == {"a": 8}
    stale = await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch - 1))
    assert stale.resync_required and "stale" in stale.reason


async def test_resync_and_deregister(reg: Reg) -> None:
    a = await register(reg, "a")
    await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=[5, 6],
                                                 delta_seq=1))

    async def msgs() -> AsyncIterator[pb.ResyncRequest]:
        yield pb.ResyncRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, block_hashes=[1, 2], used_blocks=3)
        yield pb.ResyncRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, block_hashes=[3, 2])

    resp = await reg.stub.Resync(msgs())
    assert resp.blocks_indexed == 3 and resp.next_delta_seq == 1
    assert await lookup(reg, [1, 2, 3]) == {"a": 3}
    assert await lookup(reg, [5]) == {"a": 0}
    await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=[4],
                                                 delta_seq=1))
    assert await lookup(reg, [1, 2, 3, 4]) == {"a": 4}
    dropped = await reg.stub.DeregisterNode(pb.DeregisterNodeRequest(
        node_id="a", write_token=a.write_token))
    assert dropped.blocks_dropped == 4
    assert await lookup(reg, [1]) == {}


async def test_unknown_node_is_not_found_with_resync_metadata(reg: Reg) -> None:
    call = reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="ghost", epoch=1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == Code.NOT_FOUND and "RegisterNode" in (info.value.details() or "")
    md = dict(info.value.trailing_metadata() or ())
    assert md.get("kvroute-resync-required") == "true"
    code, _ = await code_of(reg.stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="ghost")))
    assert code == Code.NOT_FOUND


async def test_bad_input_is_refused_and_changes_nothing(reg: Reg) -> None:
    code, msg = await code_of(register(reg, block_size=32))
    assert code == Code.FAILED_PRECONDITION and "32" in msg and "16" in msg
    code, msg = await code_of(register(reg, hash_scheme="sha256-v0"))
    assert code == Code.FAILED_PRECONDITION and "sha256-v0" in msg and HASH_SCHEME in msg
    for kw in ({"node_id": ""}, {"node_id": "bad id!"}, {"address": ""},
               {"capacity_blocks": 0}, {"model": ""}):
        code, _ = await code_of(register(reg, **kw))
        assert code == Code.INVALID_ARGUMENT, kw
    a = await register(reg, "a")
    code, msg = await code_of(register(reg, "a", "10.9.9.9:1"))
    assert code == Code.ALREADY_EXISTS and "10.9.9.9:1" in msg
    await register(reg, "b")
    await register(reg, "c")
    code, msg = await code_of(register(reg, "d"))
    assert code == Code.RESOURCE_EXHAUSTED and "--max-nodes" in msg
    too_many = list(range(1001))
    code, msg = await code_of(reg.stub.Heartbeat(pb.HeartbeatRequest(
        node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=too_many, delta_seq=1)))
    assert code == Code.RESOURCE_EXHAUSTED and "1000" in msg
    code, _ = await code_of(reg.stub.Heartbeat(pb.HeartbeatRequest(
        node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=[1])))
    assert code == Code.INVALID_ARGUMENT  # changes without delta_seq
    code, _ = await code_of(reg.stub.Lookup(pb.LookupRequest(block_hashes=too_many)))
    assert code == Code.RESOURCE_EXHAUSTED
    assert await lookup(reg, [1]) == {"a": 0, "b": 0, "c": 0}  # nothing was applied
    again = await register(reg, "a")  # same address: a new epoch, empty block set
    assert again.epoch > a.epoch


async def test_lookup_stream_and_watches(reg: Reg) -> None:
    a = await register(reg, "a")
    await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=[1, 2],
                                                 delta_seq=1))

    async def reqs() -> AsyncIterator[pb.LookupRequest]:
        yield pb.LookupRequest(request_id="r1", block_hashes=[1, 2, 3], model="m")
        yield pb.LookupRequest(request_id="r2", block_hashes=list(range(2000)))
        yield pb.LookupRequest(request_id="r3", block_hashes=[1], model="m")

    got = [r async for r in reg.stub.LookupStream(reqs())]
    assert [r.request_id for r in got] == ["r1", "r2", "r3"]
    assert got[0].nodes[0].matched_blocks == 2 and got[0].block_size == 16
    assert got[1].error.code == Code.RESOURCE_EXHAUSTED.value[0] and not got[1].nodes
    assert got[2].nodes[0].matched_blocks == 1

    place = reg.stub.WatchPlacement(pb.WatchPlacementRequest(model="m"))
    nodes = reg.stub.WatchNodes(pb.WatchNodesRequest())
    first = [await place.read() for _ in range(3)]
    assert [e.kind for e in first] == [pb.PlacementEvent.NODE_UPSERT, pb.PlacementEvent.BLOCKS,
                                       pb.PlacementEvent.SNAPSHOT_END]
    assert sorted(first[1].stored) == [1, 2] and first[1].cleared
    assert (await nodes.read()).type == pb.NodeEvent.SNAPSHOT
    assert (await nodes.read()).type == pb.NodeEvent.SNAPSHOT_END
    await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=[3],
                                                 removed=[1], delta_seq=2))
    blocks: list[pb.PlacementEvent] = []
    while not blocks or not blocks[-1].stored:
        ev = await place.read()
        if ev.kind == pb.PlacementEvent.BLOCKS:
            blocks.append(ev)
    assert [(list(e.removed), list(e.stored)) for e in blocks] == [([1], []), ([], [3])]
    await reg.stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="a",
                                                           write_token=a.write_token))
    ev = await place.read()
    while ev.kind != pb.PlacementEvent.NODE_REMOVED:
        ev = await place.read()
    nev = await nodes.read()
    while nev.type != pb.NodeEvent.REMOVED:
        nev = await nodes.read()
    assert nev.node.node_id == "a"
    place.cancel()
    nodes.cancel()


async def test_a_delta_too_big_for_one_etcd_value_becomes_a_snapshot(reg: Reg) -> None:
    import registry_service.core as core_mod

    old = core_mod.DELTA_KEY_MAX_BYTES
    core_mod.DELTA_KEY_MAX_BYTES = 64  # 8 hashes
    try:
        a = await register(reg, "a")
        await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token,
                                                     stored=[1, 2, 3], delta_seq=1))
        resp = await reg.stub.Heartbeat(pb.HeartbeatRequest(
            node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=list(range(4, 20)), removed=[3], delta_seq=2))
        assert not resp.resync_required
        assert await lookup(reg, [1, 2, 3]) == {"a": 2}
        assert await lookup(reg, [1, 2, *range(4, 20)]) == {"a": 18}
        await reg.stub.Heartbeat(pb.HeartbeatRequest(node_id="a", epoch=a.epoch,
        write_token=a.write_token, stored=[3],
                                                     delta_seq=3))  # deltas continue on it
        assert await lookup(reg, [1, 2, 3]) == {"a": 3}
    finally:
        core_mod.DELTA_KEY_MAX_BYTES = old


async def test_engine_block_size_and_index_state_reach_lookup_and_list(reg: Reg) -> None:
    a = await register(reg, "a")
    await reg.stub.Heartbeat(pb.HeartbeatRequest(
        node_id="a", epoch=a.epoch, write_token=a.write_token, stored=[1, 2], delta_seq=1,
        engine_block_size=32,
        engine_lookahead_tokens=1, index_state=pb.INDEX_STATE_PARTIAL,
        index_note="joined late", stored_offloaded=[7]))
    m = (await reg.stub.Lookup(pb.LookupRequest(block_hashes=[1, 2], model="m"))).nodes[0]
    assert (m.matched_blocks, m.engine_block_size, m.engine_lookahead_tokens) == (2, 32, 1)
    assert (m.index_state, m.index_note) == (pb.INDEX_STATE_PARTIAL, "joined late")
    n = (await reg.stub.ListNodes(pb.ListNodesRequest())).nodes[0]
    assert (n.engine_block_size, n.index_state, n.index_note) == (
        32, pb.INDEX_STATE_PARTIAL, "joined late")
    for bad in (dict(engine_block_size=1 << 17), dict(index_note="x" * 600),
                dict(stored_offloaded=list(range(1001)))):
        code, msg = await code_of(reg.stub.Heartbeat(pb.HeartbeatRequest(
            node_id="a", epoch=a.epoch, write_token=a.write_token,
            **bad)))  # type: ignore[arg-type]
        assert code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED), (bad, msg)
    bad_state = pb.HeartbeatRequest(node_id="a", epoch=a.epoch, write_token=a.write_token)
    bad_state.index_state = 9  # type: ignore[assignment]
    code, msg = await code_of(reg.stub.Heartbeat(bad_state))
    assert code == Code.INVALID_ARGUMENT and "index_state" in msg


async def test_node_roles_are_registered_listed_and_looked_up(reg: Reg) -> None:
    await register(reg, "p", role="prefill")
    await register(reg, "d", "10.0.0.2:8000", role="decode")
    await register(reg, "x", "10.0.0.3:8000")  # no role = both (older agents)
    nodes = {n.node_id: n.role for n in (await reg.stub.ListNodes(pb.ListNodesRequest())).nodes}
    assert nodes == {"p": "prefill", "d": "decode", "x": "both"}
    resp = await reg.stub.Lookup(pb.LookupRequest(block_hashes=[1], model="m"))
    assert {n.node_id: n.role for n in resp.nodes} == nodes
    code, msg = await code_of(register(reg, "p", role="encoder"))
    assert code == Code.INVALID_ARGUMENT and "role" in msg


async def test_lookup_matched_only_lists_the_matching_nodes_and_counts_the_rest(reg: Reg) -> None:
    held = {"a": [1, 2, 3], "b": [1, 2], "c": [9]}
    for i, (node, hashes) in enumerate(held.items()):
        r = await register(reg, node, f"10.0.0.{i + 1}:8000")
        await reg.stub.Heartbeat(pb.HeartbeatRequest(
            node_id=node, epoch=r.epoch, write_token=r.write_token, stored=hashes,
            delta_seq=1))

    async def ask(hashes: list[int], model: str = "m", **kw: bool) -> pb.LookupResponse:
        return await reg.stub.Lookup(pb.LookupRequest(block_hashes=hashes, model=model, **kw))

    full = await ask([1, 2, 3])  # the default answer is unchanged: every node of the model
    assert [(n.node_id, n.matched_blocks) for n in full.nodes] == [("a", 3), ("b", 2), ("c", 0)]
    assert full.model_nodes == 3
    only = await ask([1, 2, 3], matched_only=True)  # longest match first, same fields
    assert [(n.node_id, n.matched_blocks) for n in only.nodes] == [("a", 3), ("b", 2)]
    assert only.model_nodes == 3 and only.block_size == 16
    assert only.nodes[0] == full.nodes[0]
    none = await ask([7], matched_only=True, include_unhealthy=True)
    assert list(none.nodes) == [] and none.model_nodes == 3  # served, nothing matched
    other = await ask([1], model="other", matched_only=True)
    assert list(other.nodes) == [] and other.model_nodes == 0  # not served
    assert (await ask([1], model="", matched_only=True)).model_nodes == 3
