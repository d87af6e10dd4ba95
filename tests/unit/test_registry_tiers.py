"""The offloaded (lower) tier through the Registry RPCs (real gRPC, memory store): heartbeat
and resync ingest, Lookup's device-then-offloaded match, tier moves, ListNodes and
WatchPlacement."""

from __future__ import annotations

from collections.abc import AsyncIterator

from kvroute.v1 import registry_pb2 as pb
from tests.unit.test_registry_api import Reg, reg, register

__all__ = ["reg"]  # the fixture, imported for pytest


async def tiers(r: Reg, hashes: list[int]) -> dict[str, tuple[int, int]]:
    resp = await r.stub.Lookup(pb.LookupRequest(block_hashes=hashes, model="m"))
    return {n.node_id: (n.matched_blocks, n.offloaded_blocks) for n in resp.nodes}


async def test_offloaded_blocks_are_a_lower_tier_of_the_match(reg: Reg) -> None:
    a = await register(reg, "a")
    beat = {"node_id": "a", "epoch": a.epoch, "write_token": a.write_token}
    # an offloaded-only delta takes a delta_seq like any other (it used to be skipped, so
    # the next delta looked like a gap and forced a resync)
    r = await reg.stub.Heartbeat(pb.HeartbeatRequest(**beat, stored_offloaded=[1, 2, 3],
                                                     delta_seq=1))
    assert not r.resync_required
    assert await tiers(reg, [1, 2, 3, 4]) == {"a": (0, 3)}
    r = await reg.stub.Heartbeat(pb.HeartbeatRequest(**beat, stored=[1, 2], delta_seq=2))
    assert not r.resync_required
    assert await tiers(reg, [1, 2, 3, 4]) == {"a": (2, 1)}  # GPU credit, then CPU credit
    # evicted from GPU, kept on CPU: the block moves tiers
    await reg.stub.Heartbeat(pb.HeartbeatRequest(**beat, removed=[2], delta_seq=3))
    assert await tiers(reg, [1, 2, 3, 4]) == {"a": (1, 2)}
    # a removal with the offloaded medium removes that tier only
    await reg.stub.Heartbeat(pb.HeartbeatRequest(**beat, removed_offloaded=[1, 3],
                                                 delta_seq=4))
    assert await tiers(reg, [1, 2, 3, 4]) == {"a": (1, 1)}
    [info] = (await reg.stub.ListNodes(pb.ListNodesRequest(model="m"))).nodes
    assert info.blocks_indexed == 1 and info.offloaded_blocks_indexed == 1
    # cleared drops every tier
    await reg.stub.Heartbeat(pb.HeartbeatRequest(**beat, cleared=True, delta_seq=5))
    assert await tiers(reg, [1, 2]) == {"a": (0, 0)}


async def test_resync_and_snapshots_carry_the_offloaded_tier(reg: Reg) -> None:
    a = await register(reg, "a")

    async def msgs() -> AsyncIterator[pb.ResyncRequest]:
        yield pb.ResyncRequest(node_id="a", epoch=a.epoch, write_token=a.write_token,
                               block_hashes=[1], offloaded_block_hashes=[2, 3])
        yield pb.ResyncRequest(node_id="a", epoch=a.epoch, offloaded_block_hashes=[4])

    resp = await reg.stub.Resync(msgs())
    assert resp.blocks_indexed == 1
    assert await tiers(reg, [1, 2, 3, 4, 5]) == {"a": (1, 3)}
    beat = {"node_id": "a", "epoch": a.epoch, "write_token": a.write_token}
    for seq in range(1, 5):  # past the snapshot threshold (3): compacted with both tiers
        await reg.stub.Heartbeat(pb.HeartbeatRequest(**beat, stored_offloaded=[5 + seq],
                                                     delta_seq=seq))
    assert await tiers(reg, [1, 2, 3, 4, 6, 7]) == {"a": (1, 5)}

    place = reg.stub.WatchPlacement(pb.WatchPlacementRequest(model="m"))
    events = []
    while not events or events[-1].kind != pb.PlacementEvent.SNAPSHOT_END:
        events.append(await place.read())
    blocks = [e for e in events if e.kind == pb.PlacementEvent.BLOCKS]
    assert sorted(h for e in blocks for h in e.stored) == [1]
    assert sorted(h for e in blocks for h in e.stored_offloaded) == [2, 3, 4, 6, 7, 8, 9]
    await reg.stub.Heartbeat(pb.HeartbeatRequest(**beat, removed_offloaded=[2], stored=[2],
                                                 delta_seq=5))
    live: list[pb.PlacementEvent] = []
    while not live or not live[-1].removed_offloaded:
        ev = await place.read()
        if ev.kind == pb.PlacementEvent.BLOCKS:
            live.append(ev)
    assert [(list(e.stored), list(e.removed_offloaded)) for e in live] == [([2], []), ([], [2])]
    place.cancel()
