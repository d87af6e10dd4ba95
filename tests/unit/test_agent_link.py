"""The agent in-process against an in-process registry (memory store, real gRPC on loopback)
and a test-side ZMQ publisher: blocks reach Lookup, removals and engine restarts apply, a
restarted registry gets a full resync, a block-size mismatch is refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import msgspec
import pytest

from kvroute.blocks import hash_blocks
from kvroute.procs import free_port
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from node_agent.registry_link import RegistrationRefused
from node_agent.server import Agent
from node_agent.settings import AgentSettings
from registry_service.server import serve
from registry_service.settings import RegistrySettings
from tests.unit.test_agent_zmq_source import TestPublisher

TOKS = list(range(300, 364))


class Registry:
    """An in-process registry on a fixed port that can be restarted empty."""

    def __init__(self, tmp: Path, block_size: int = 16) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.block_size = block_size
        self.task: asyncio.Task[int] | None = None
        self.stop_ev = asyncio.Event()

    async def start(self) -> None:
        ready = self.tmp / f"reg-{self.port}.json"
        ready.unlink(missing_ok=True)
        s = RegistrySettings(store="memory", listen=f"127.0.0.1:{self.port}",
                             ready_file=str(ready), lease_ttl_s=30,
                             block_size=self.block_size, status_write_interval_s=0)
        self.stop_ev = asyncio.Event()
        self.task = asyncio.create_task(serve(s, self.stop_ev))
        for _ in range(250):
            if ready.exists():
                return
            await asyncio.sleep(0.02)
        raise TimeoutError("registry did not start")

    async def stop(self) -> None:
        self.stop_ev.set()
        if self.task is not None:
            await self.task

    async def matched(self, hashes: list[int]) -> dict[str, int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            resp = await pb_grpc.RegistryStub(ch).Lookup(
                pb.LookupRequest(block_hashes=hashes, model="m"))
        return {n.node_id: n.matched_blocks for n in resp.nodes}


def stored(hashes: list[int], parent: int | None, toks: list[int]) -> bytes:
    ev = ["BlockStored", hashes, parent, toks, 16, None, "GPU"]
    return msgspec.msgpack.encode([1.0, [ev], 0])


def removed(hashes: list[int]) -> bytes:
    return msgspec.msgpack.encode([1.0, [["BlockRemoved", hashes, "GPU"]], 0])


async def send(pub: TestPublisher, data: bytes) -> None:
    seq = pub.seq
    pub.seq += 1
    pub.buffer.append((seq, data))
    await pub.pub.send_multipart([pub.topic, seq.to_bytes(8, "big"), data])


async def eventually(check: Callable[[], object], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            if await check():  # type: ignore[misc]
                return
        except grpc.aio.AioRpcError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def agent_rig(reg: Registry, buffer_steps: int = 100, **kw: object,
                    ) -> AsyncIterator[tuple[Agent, TestPublisher]]:
    pub = TestPublisher(buffer_steps=buffer_steps)
    s = AgentSettings(registry=f"127.0.0.1:{reg.port}", node_id="n1", engine_url="http://e:1",
                      model="m", capacity_blocks=100, topic="kv",
                      engine_events=f"tcp://127.0.0.1:{pub.pub_port}",
                      engine_replay=f"tcp://127.0.0.1:{pub.replay_port}",
                      heartbeat_interval_s=0.05, rpc_timeout_s=2.0, replay_timeout_s=3.0,
                      engine_health_path="", **kw)  # type: ignore[arg-type]
    agent = Agent(s)
    tasks = [asyncio.create_task(agent.consume()), asyncio.create_task(agent.link.run())]
    try:
        await pub.wait_subscribed()
        yield agent, pub
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await agent.link.close()
        await agent.source.close()
        await agent.usage.close()
        await pub.close()


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    reg = Registry(tmp_path)
    await reg.start()
    yield reg
    await reg.stop()


async def test_blocks_flow_to_lookup_and_follow_evictions_and_restarts(
        registry: Registry) -> None:
    want = hash_blocks(TOKS, 16)
    async with agent_rig(registry) as (agent, pub):
        await send(pub, stored([11, 12], None, TOKS[:32]))
        await send(pub, stored([13, 14], 12, TOKS[32:]))

        async def four() -> bool:
            return await registry.matched(want) == {"n1": 4}
        await eventually(four)
        await send(pub, removed([13, 14]))

        async def two() -> bool:
            return await registry.matched(want) == {"n1": 2}
        await eventually(two)
        # the engine restarts: seq back to 0, new blocks for other tokens
        pub.restart()
        other = list(range(900, 916))
        await send(pub, stored([77], None, other))

        async def restarted() -> bool:
            return (await registry.matched(want) == {"n1": 0}
                    and await registry.matched(hash_blocks(other, 16)) == {"n1": 1})
        await eventually(restarted)
        assert agent.source.stats.engine_restarts == 1
        assert agent.link.stats.max_heartbeat_bytes > 0


async def test_registry_restarted_empty_gets_a_full_resync(registry: Registry) -> None:
    want = hash_blocks(TOKS, 16)
    async with agent_rig(registry) as (agent, pub):
        await send(pub, stored([11, 12, 13, 14], None, TOKS))

        async def full() -> bool:
            return await registry.matched(want) == {"n1": 4}
        await eventually(full)
        resyncs = agent.link.stats.resyncs
        await registry.stop()
        await registry.start()  # same port, empty memory store
        await eventually(full, 15)

        # The registry indexes the resync stream before the agent reads its answer and counts
        # the resync: wait for the count rather than reading it the moment the blocks show.
        async def counted() -> bool:
            return agent.link.stats.resyncs > resyncs
        await eventually(counted, 15)
        assert agent.link.stats.registrations >= 2


async def test_block_size_mismatch_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path, block_size=32)
    await reg.start()
    try:
        async with agent_rig(reg) as (agent, _pub):
            with pytest.raises(RegistrationRefused, match="block size"):
                await asyncio.wait_for(agent.link.run(), 5)
    finally:
        await reg.stop()


async def test_status_reports_usage_from_events(registry: Registry) -> None:
    async with agent_rig(registry) as (_agent, pub):
        await send(pub, stored([11, 12, 13], None, TOKS[:48]))

        async def used() -> bool:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as ch:
                resp = await pb_grpc.RegistryStub(ch).ListNodes(pb.ListNodesRequest())
            return [(n.node_id, n.used_blocks, n.blocks_indexed) for n in resp.nodes] == [
                ("n1", 3, 3)]
        await eventually(used)




async def test_sglang_pages_of_one_token_are_rechunked_into_router_blocks(
        registry: Registry) -> None:
    toks = TOKS[:40]  # 2 full kvroute blocks + 8 tokens that must not be indexed
    async with agent_rig(registry, engine_format="sglang") as (agent, pub):
        parent = None
        events = []
        for i, t in enumerate(toks):
            h = -(i + 1) * 7_919  # SGLang: signed int64 hashes
            events.append({"type": "BlockStored", "block_hashes": [h], "parent_block_hash": parent,
                           "token_ids": [t], "block_size": 1, "lora_id": None, "medium": "GPU"})
            parent = h
        await send(pub, msgspec.msgpack.encode([1.0, events, 0]))
        want = hash_blocks(toks, 16)

        async def two() -> bool:
            return await registry.matched([*want, 12345]) == {"n1": 2}
        await eventually(two)
        assert agent.blocks.held_blocks == 2


async def test_gap_older_than_the_replay_buffer_triggers_a_resync(registry: Registry) -> None:
    want = hash_blocks(TOKS, 16)
    async with agent_rig(registry, buffer_steps=1) as (agent, pub):
        await send(pub, stored([11], None, TOKS[:16]))

        async def first() -> bool:
            return await registry.matched(want) == {"n1": 1}
        await eventually(first)
        resyncs = agent.link.stats.resyncs
        # two batches lost on the wire; the engine's buffer (1 batch) cannot replay the first
        for data in (stored([12], 11, TOKS[16:32]), removed([11])):
            seq = pub.seq
            pub.seq += 1
            pub.buffer.append((seq, data))
        await send(pub, stored([21], None, list(range(7000, 7016))))

        async def resynced() -> bool:
            return (agent.link.stats.resyncs > resyncs
                    and await registry.matched(hash_blocks(range(7000, 7016), 16)) == {"n1": 1})
        await eventually(resynced)
        assert agent.source.stats.events_lost == 1
        # what the agent knows and the registry holds agree after the resync
        assert sorted(agent.blocks.canonical_hashes()) == sorted(
            [want[0], *hash_blocks(range(7000, 7016), 16)])
