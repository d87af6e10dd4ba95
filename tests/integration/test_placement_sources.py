"""The placement-source contract, one suite over both sources (index mirror and lookup stream).

Against a real registry process on real etcd, with nodes registered and heartbeating through the
Registry gRPC API from the test. Every source must:

- list every node of the model with its matched prefix and the registry's block size, and the
  offloaded (lower-tier) blocks continuing it;
- list the nodes of a model that are all unhealthy (late heartbeats), marked unhealthy: the
  model IS served, so the router answers UNAVAILABLE ("no healthy node"), never NOT_FOUND;
- answer an empty list for a model no node serves (the router answers NOT_FOUND);
- drop a deregistered node; know the nodes for degraded routing (``last_known``);
- raise Unavailable once the registry is gone (the router degrades).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from kvroute.blocks import hash_blocks
from kvroute.errors import NotFound, Unavailable
from kvroute.v1 import registry_pb2 as rpb
from kvroute.v1 import registry_pb2_grpc
from router_service.core import RouterCore
from router_service.domain import RouteRequest
from router_service.placement import PlacementSource
from router_service.runtime import build_core
from router_service.settings import RouterSettings
from tests.harness import ServerProcess, start_server

pytestmark = pytest.mark.integration

BS = 16
TOKENS = list(range(900, 900 + 8 * BS))
H = hash_blocks(TOKENS, BS)
NODES = {"a": ("m", H[:3]), "b": ("m", H[:7]), "c": ("other", H[:5])}
OFFLOADED = {"b": H[6:8], "c": H[5:7]}
"""Blocks on each node's offloading medium (CPU): b's block 6 is on both tiers."""
T = TypeVar("T")


@dataclass
class Fleet:
    """Plays the node agents: register, first heartbeat with blocks, then beats while alive."""

    target: str
    alive: set[str] = field(default_factory=lambda: set(NODES))
    epochs: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    """RegisterNodeResponse.write_token per node (authorises its writes)."""
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for nid, (model, blocks) in NODES.items():
            await self.add(nid, model, blocks, OFFLOADED.get(nid, []))
        self.task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = registry_pb2_grpc.RegistryStub(ch)
            while True:
                for nid in sorted(self.alive):
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.Heartbeat(rpb.HeartbeatRequest(
                            node_id=nid, epoch=self.epochs[nid],
                            write_token=self.tokens[nid]), timeout=2)
                await asyncio.sleep(0.1)

    async def add(self, nid: str, model: str, blocks: list[int],
                  offloaded: list[int] | None = None) -> None:
        """Register a node with its blocks (it heartbeats from then on)."""
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = registry_pb2_grpc.RegistryStub(ch)
            r = await stub.RegisterNode(rpb.RegisterNodeRequest(
                node_id=nid, address=f"{nid}.local:8000", model=model, block_size=BS,
                capacity_blocks=100), timeout=5)
            self.epochs[nid], self.tokens[nid] = r.epoch, r.write_token
            await stub.Heartbeat(rpb.HeartbeatRequest(
                node_id=nid, epoch=r.epoch, write_token=r.write_token, stored=blocks,
                stored_offloaded=offloaded or [], delta_seq=1,
                used_blocks=len(blocks)), timeout=5)
        self.alive.add(nid)

    async def deregister(self, nid: str) -> None:
        self.alive.discard(nid)
        async with grpc.aio.insecure_channel(self.target) as ch:
            await registry_pb2_grpc.RegistryStub(ch).DeregisterNode(
                rpb.DeregisterNodeRequest(node_id=nid, epoch=self.epochs[nid],
                                          write_token=self.tokens[nid]), timeout=5)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def eventually(check: Callable[[], Awaitable[T | None]], what: str,
                     timeout_s: float = 15.0) -> T:
    """Poll ``check`` until it returns a value (roomy timeout: the machine is shared)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: object = None
    while True:
        try:
            got = await check()
            if got is not None:
                return got
        except Exception as exc:
            last = exc
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")
        await asyncio.sleep(0.1)


@pytest.fixture
async def registry(etcd_endpoint: str, etcd_prefix: str, tmp_path: Path,
                   ) -> AsyncIterator[tuple[ServerProcess, Fleet]]:
    # the fleet beats every 0.1 s; the registry calls a node late (unhealthy) after 2 x 2 +
    # 0.2 s without one, and its lease lives 30 s. (With a 0.2-s interval a node was late
    # after 1 s: a stall that long on a loaded machine made the nodes that must stay healthy,
    # c while a and b turn late, or b when it is routed to, late too.)
    reg = start_server("registry", [
        "--etcd-endpoints", etcd_endpoint, "--etcd-prefix", etcd_prefix, "--block-size",
        str(BS), "--lease-ttl-s", "30", "--heartbeat-interval-s", "2",
        "--status-write-interval-s", "0.2"], tmp_path)
    fleet = Fleet(reg.grpc_target)
    try:
        await fleet.start()
        yield reg, fleet
    finally:
        await fleet.stop()
        reg.stop()


def _core(target: str, mode: str, **kw: float) -> RouterCore:
    s = RouterSettings(registry=target, registry_mode=mode, block_size=BS,
                       default_policy="kv_aware", mirror_max_staleness_s=1.0,
                       registry_retry_max_s=0.3, lookup_timeout_s=1.0,
                       **{"node_cache_ttl_s": 0.3, **kw})  # type: ignore[arg-type]
    return build_core(s, {}, None)


async def _matched(source: PlacementSource, model: str) -> dict[str, tuple[int, bool]]:
    placement = await source.lookup(H, model)
    assert placement.block_size == BS
    return {n.node_id: (m, n.healthy) for n, m in placement.nodes}


@pytest.mark.parametrize("mode", ["mirror", "stream"])
async def test_placement_source_contract(
        mode: str, registry: tuple[ServerProcess, Fleet]) -> None:
    reg, fleet = registry
    core = _core(reg.grpc_target, mode)
    source = core.source
    assert source.mode == mode
    await source.start()
    try:
        async def all_healthy() -> dict[str, tuple[int, bool]] | None:
            got = await _matched(source, "m")
            return got if got == {"a": (3, True), "b": (7, True)} else None

        await eventually(all_healthy, "every node of m with its matched prefix")
        assert await _matched(source, "other") == {"c": (5, True)}
        assert (await source.lookup(H, "m")).offloaded == {"b": 1}  # GPU 0-6, then CPU 7
        assert (await source.lookup(H, "other")).offloaded == {"c": 2}
        assert (await source.lookup(H, "nope")).nodes == []  # not served: empty, no error
        with pytest.raises(NotFound, match="no node serves model 'nope'"):
            await core.decide(RouteRequest(request_id="x", token_ids=TOKENS, model="nope"))

        fleet.alive -= {"a", "b"}  # every node of m turns late; leases stay

        async def all_late() -> dict[str, tuple[int, bool]] | None:
            got = await _matched(source, "m")
            return got if got == {"a": (3, False), "b": (7, False)} else None

        await eventually(all_late, "the nodes of m listed, unhealthy")
        with pytest.raises(Unavailable, match="no healthy node serves model 'm'"):
            await core.decide(RouteRequest(request_id="y", token_ids=TOKENS, model="m"))
        routed = await core.decide(RouteRequest(request_id="z", token_ids=TOKENS,
                                                model="other"))
        assert routed.node_id == "c" and routed.matched_blocks == 5 and not routed.degraded
        assert (routed.expected_cached_tokens, routed.offloaded_blocks,
                routed.expected_offloaded_tokens) == (80, 2, 32)

        await fleet.deregister("b")

        async def b_gone() -> dict[str, tuple[int, bool]] | None:
            got = await _matched(source, "m")
            return got if set(got) == {"a"} else None

        await eventually(b_gone, "a deregistered node leaves the placement")
        known = await eventually(
            lambda: _known(source, {"a", "c"}), "last_known lists the live nodes")
        assert known == {"a", "c"} and source.nodes_known() == 2
        assert source.registry_block_size() == BS

        reg.stop()

        async def refused() -> bool | None:
            try:
                await source.lookup(H, "other")
            except Unavailable:
                return True
            return None

        await eventually(refused, "Unavailable once the registry is gone")
        assert {n.node_id for n in source.last_known()} == {"a", "c"}
    finally:
        await source.stop()


async def _known(source: PlacementSource, want: set[str]) -> set[str] | None:
    got = {n.node_id for n in source.last_known()}
    return got if got == want else None


@pytest.mark.parametrize("mode", ["mirror", "stream"])
async def test_large_fleets_score_a_narrowed_candidate_set_in_both_modes(
        mode: str, registry: tuple[ServerProcess, Fleet]) -> None:
    """More nodes than --max-candidates: the decision scores the nodes holding the longest
    prefix plus the least loaded, not the whole fleet (stream mode asks the registry for the
    matching nodes only); a node that joins or leaves is known after one decision at most."""
    reg, fleet = registry
    # stream mode: the node list is refreshed only at start, so only lookups can update it
    core = _core(reg.grpc_target, mode, max_candidates=4, node_cache_ttl_s=120.0)
    source = core.source
    for nid in ("d", "e", "f", "g", "h"):
        await fleet.add(nid, "m", [])
    await source.start()
    try:
        async def seven() -> bool | None:
            await core.decide(RouteRequest(request_id="w", token_ids=TOKENS, model="m"))
            core.complete("w")
            return True if len(source.members("m")) == 7 else None  # type: ignore[attr-defined]

        await eventually(seven, "the seven nodes of m known")
        got = await core.decide(RouteRequest(request_id="r1", token_ids=TOKENS, model="m"))
        assert got.node_id == "b" and got.matched_blocks == 7 and not got.degraded
        assert 2 <= len(got.candidates) <= 4, got.candidates  # narrowed: not all seven

        await fleet.add("i", "m", H[:8])  # joins holding the whole prompt

        async def i_routed() -> bool | None:
            d = await core.decide(RouteRequest(request_id="r2", token_ids=TOKENS, model="m"))
            core.complete("r2")
            return True if d.node_id == "i" and d.matched_blocks == 7 else None

        await eventually(i_routed, "a joining node is routed to")
        assert "i" in {n.node_id for n in source.members("m")}  # type: ignore[attr-defined]

        departed: list[str] = []
        source.on_departure(departed.append)
        await fleet.deregister("b")

        async def b_gone() -> bool | None:
            d = await core.decide(RouteRequest(request_id="r3", token_ids=TOKENS, model="m"))
            core.complete("r3")
            return True if departed == ["b"] and d.node_id != "b" else None

        await eventually(b_gone, "a departed node is reported and no longer routed to")
        assert "b" not in {n.node_id for n in source.members("m")}  # type: ignore[attr-defined]
    finally:
        await source.stop()
