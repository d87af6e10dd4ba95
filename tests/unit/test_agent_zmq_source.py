"""ZMQ event source against a test-side publisher (real XPUB + ROUTER sockets on loopback):
in-order delivery, gap recovery by replay (both reply shapes), gaps older than the buffer,
engine restarts, late join, malformed frames."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvroute.procs import free_port
from node_agent.events import EngineBatch, IndexState, SignalKind, SourceItem, SourceSignal
from node_agent.parse_vllm import VllmParser
from node_agent.zmq_source import END_SEQ, ZmqEventSource


def payload(seq: int) -> bytes:
    ev = {"type": "BlockStored", "block_hashes": [seq + 1], "parent_block_hash": None,
          "token_ids": list(range(16)), "block_size": 16, "lora_id": None, "medium": "GPU"}
    return msgspec.msgpack.encode([1.0, [ev], 0])


class TestPublisher:
    """vLLM's publisher side: XPUB (so the test can wait for the subscription) + ROUTER replay
    with a bounded buffer. ``reply_shape``: "plain" = [seq, payload], "topic" = [topic, seq,
    payload] (after vLLM PR #45177); "silent" never answers."""

    __test__ = False

    def __init__(self, buffer_steps: int = 100, reply_shape: str = "plain",
                 topic: bytes = b"kv", ports: tuple[int, int] | None = None) -> None:
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub_port, self.replay_port = ports or (free_port(), free_port())
        self.pub.bind(f"tcp://127.0.0.1:{self.pub_port}")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(f"tcp://127.0.0.1:{self.replay_port}")
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.reply_shape = reply_shape
        self.topic = topic
        self.seq = 0
        self.replay_requests: list[int] = []
        self._task = asyncio.create_task(self._serve_replay())

    async def wait_subscribed(self) -> None:
        msg = await asyncio.wait_for(self.pub.recv(), 5)
        assert msg[:1] == b"\x01"

    async def publish(self, drop: bool = False) -> int:
        seq, data = self.seq, payload(self.seq)
        self.seq += 1
        self.buffer.append((seq, data))
        if not drop:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), data])
        return seq

    async def rebind_pub(self) -> None:
        """Drop and re-create the PUB socket (a network blip: same engine, same buffer)."""
        self.pub.close(0)
        await asyncio.sleep(0.2)
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.bind(f"tcp://127.0.0.1:{self.pub_port}")

    async def subscribed_again(self) -> None:
        """Wait until the subscriber re-subscribed on the new PUB socket."""
        await self.wait_subscribed()

    def restart(self) -> None:
        self.seq = 0
        self.buffer.clear()

    async def raw(self, frames: list[bytes]) -> None:
        await self.pub.send_multipart(frames)

    async def _serve_replay(self) -> None:
        while True:
            ident, _empty, start_b = await self.router.recv_multipart()
            start = int.from_bytes(start_b, "big")
            self.replay_requests.append(start)
            if self.reply_shape == "silent":
                continue
            head = [ident, b""] + ([self.topic] if self.reply_shape == "topic" else [])
            for seq, data in list(self.buffer):
                if seq >= start:
                    await self.router.send_multipart([*head, seq.to_bytes(8, "big"), data])
            await self.router.send_multipart([*head, END_SEQ, b""])

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.pub.close(0)
        self.router.close(0)
        self.ctx.term()


class Collector:
    """Runs the source and collects what it yields."""

    def __init__(self, source: ZmqEventSource) -> None:
        self.source = source
        self.items: asyncio.Queue[SourceItem] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for item in self.source.items():
            await self.items.put(item)

    async def take(self, n: int) -> list[SourceItem]:
        return [await asyncio.wait_for(self.items.get(), 10) for _ in range(n)]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.source.close()


def desc(items: list[SourceItem]) -> list[object]:
    return [i.kind.value if isinstance(i, SourceSignal) else (i.seq, i.replayed)
            for i in items]


def make_source(pub: TestPublisher, replay: bool = True,
                replay_timeout_s: float = 3.0) -> ZmqEventSource:
    return ZmqEventSource(f"tcp://127.0.0.1:{pub.pub_port}", VllmParser(),
                          replay_endpoint=f"tcp://127.0.0.1:{pub.replay_port}" if replay
                          else "", topic="kv", replay_timeout_s=replay_timeout_s)


async def started(col: Collector) -> None:
    """Until the source's replay at start was answered."""
    for _ in range(500):
        if col.source.health.state is not IndexState.NO_EVENTS:
            return
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def rig(replay: bool = True, replay_timeout_s: float = 3.0, before: int = 0,
              **kw: object) -> AsyncIterator[tuple[TestPublisher, Collector]]:
    """A publisher and a running source; ``before`` batches are published (unheard) before the
    source starts. Returns once the source's replay at start has been answered."""
    pub = TestPublisher(**kw)  # type: ignore[arg-type]
    for _ in range(before):
        await pub.publish(drop=True)
    col = Collector(make_source(pub, replay, replay_timeout_s))
    try:
        await pub.wait_subscribed()
        if replay and kw.get("reply_shape") != "silent":
            await started(col)
        yield pub, col
    finally:
        await col.close()
        await pub.close()


async def test_in_order_batches_are_decoded() -> None:
    async with rig() as (pub, col):
        for _ in range(3):
            await pub.publish()
        items = await col.take(3)
        assert desc(items) == [(0, False), (1, False), (2, False)]
        assert isinstance(items[2], EngineBatch)
        assert items[2].batch.events[0].engine_hashes == (3,)  # type: ignore[union-attr]
        assert col.source.stats.gaps == 0 and col.source.stats.replays == 0


@pytest.mark.parametrize("shape", ["plain", "topic"])
async def test_gap_is_recovered_by_replay(shape: str) -> None:
    async with rig(reply_shape=shape) as (pub, col):
        await pub.publish()
        await pub.publish(drop=True)
        await pub.publish(drop=True)
        await pub.publish()
        await pub.publish()
        items = await col.take(5)
        assert [i.seq for i in items if isinstance(i, EngineBatch)] == [0, 1, 2, 3, 4]
        assert desc(items)[1:3] == [(1, True), (2, True)]
        assert pub.replay_requests == [0, 1]  # the replay at start, then the gap
        st = col.source.stats
        assert (st.gaps, st.replays, st.events_lost, st.replays_failed) == (1, 1, 0, 0)
        assert col.items.empty()


async def test_gap_older_than_the_buffer_asks_for_a_resync() -> None:
    async with rig(buffer_steps=2) as (pub, col):
        await pub.publish()
        for _ in range(4):
            await pub.publish(drop=True)
        await pub.publish()  # seq 5; buffer holds 4, 5
        items = await col.take(4)
        assert desc(items) == [(0, False), (4, True), (5, True), "events_lost"]
        assert col.source.stats.events_lost == 1


async def test_no_replay_socket_means_resync_on_gap() -> None:
    async with rig(replay=False) as (pub, col):
        await pub.publish()
        await pub.publish(drop=True)
        await pub.publish()
        items = await col.take(3)
        assert desc(items) == [(0, False), "events_lost", (2, False)]


async def test_replay_timeout_is_a_lost_gap() -> None:
    async with rig(reply_shape="silent", replay_timeout_s=0.5) as (pub, col):
        await pub.publish()
        await pub.publish(drop=True)
        await pub.publish()
        items = await col.take(3)
        assert desc(items) == [(0, False), "events_lost", (2, False)]
        assert col.source.stats.replays_failed == 2  # the replay at start and the gap


async def test_sequence_back_to_zero_is_an_engine_restart() -> None:
    async with rig() as (pub, col):
        for _ in range(3):
            await pub.publish()
        pub.restart()
        await pub.publish()
        await pub.publish()
        items = await col.take(6)
        assert desc(items) == [(0, False), (1, False), (2, False), "engine_restart",
                               (0, False), (1, False)]
        assert col.source.stats.engine_restarts == 1


async def test_restart_whose_first_batches_were_missed_replays_from_zero() -> None:
    async with rig() as (pub, col):
        for _ in range(4):
            await pub.publish()
        pub.restart()
        await pub.publish(drop=True)
        await pub.publish()
        items = await col.take(7)
        assert desc(items)[4:] == ["engine_restart", (0, True), (1, True)]
        assert pub.replay_requests == [0, 0]  # at start, then after the restart
        assert SignalKind.ENGINE_RESTART.value in desc(items)


async def test_late_join_replays_from_zero_without_a_resync() -> None:
    async with rig(before=3) as (pub, col):  # 3 batches published before the agent started
        items = await col.take(3)  # learned at start, although the engine is idle
        assert desc(items) == [(0, True), (1, True), (2, True)]
        await pub.publish()
        assert desc(await col.take(1)) == [(3, False)]
        assert col.source.stats.events_lost == 0 and col.source.stats.gaps == 0
        assert col.source.health.state is IndexState.COMPLETE


async def test_late_join_past_the_buffer_is_partial_and_says_so() -> None:
    async with rig(before=5, buffer_steps=2) as (_pub, col):
        assert desc(await col.take(2)) == [(3, True), (4, True)]
        assert col.source.health.state is IndexState.PARTIAL
        assert "seq 3" in col.source.health.note and col.source.stats.late_joins == 1


async def test_late_join_without_replay_is_partial_and_says_so() -> None:
    async with rig(replay=False, before=2) as (pub, col):
        assert col.source.health.state is IndexState.NO_EVENTS
        await pub.publish()
        assert desc(await col.take(1)) == [(2, False)]
        assert col.source.health.state is IndexState.PARTIAL
        assert "first engine batch seen is seq 2" in col.source.health.note


async def test_other_topic_is_counted_logged_and_named(caplog: pytest.LogCaptureFixture,
                                                        ) -> None:
    async with rig(topic=b"llm@10.0.0.5@conf-model") as (pub, col):  # agent: --topic kv
        for _ in range(3):
            await pub.publish()
        for _ in range(100):
            if col.source.stats.topic_mismatches == 3:
                break
            await asyncio.sleep(0.02)
        assert col.source.stats.topic_mismatches == 3 and col.items.empty()
        # the replay at start answered, but no batch under our topic was ever applied
        assert "llm@10.0.0.5@conf-model" in caplog.text
        assert "llm@10.0.0.5@conf-model" in col.source.health.note


async def test_malformed_frames_and_payloads_are_skipped() -> None:
    async with rig() as (pub, col):
        await pub.publish()
        await pub.raw([b"kv", b"\x00" * 8])  # two frames
        await pub.raw([b"kv", b"\x00" * 7, b"x"])  # short seq
        seq = pub.seq
        pub.seq += 1
        pub.buffer.append((seq, b"\xc1garbage"))
        await pub.raw([b"kv", seq.to_bytes(8, "big"), b"\xc1garbage"])  # bad msgpack
        await pub.publish()
        items = await col.take(2)
        assert desc(items) == [(0, False), (2, False)]
        assert col.source.stats.bad_frames == 2
        assert col.source.stats.unparsable_batches == 1


async def test_reconnect_to_a_new_engine_is_a_restart_even_without_new_live_batches() -> None:
    pub = TestPublisher()
    col = Collector(make_source(pub))
    try:
        await pub.wait_subscribed()
        await started(col)
        for _ in range(3):
            await pub.publish()
        assert desc(await col.take(3)) == [(0, False), (1, False), (2, False)]
        ports = (pub.pub_port, pub.replay_port)
        await pub.close()
        await asyncio.sleep(0.2)
        pub = TestPublisher(ports=ports)  # the restarted engine, same endpoints
        await pub.publish(drop=True)  # its first batch went out before we reconnected
        items = await col.take(2)
        assert desc(items) == ["engine_restart", (0, True)]
        assert col.source.stats.reconnects == 1
    finally:
        await col.close()
        await pub.close()


async def test_reconnect_to_the_same_engine_fetches_what_was_missed() -> None:
    async with rig() as (pub, col):
        for _ in range(2):
            await pub.publish()
        assert desc(await col.take(2)) == [(0, False), (1, False)]
        await pub.rebind_pub()
        await pub.publish(drop=True)  # published while we were disconnected
        items = await col.take(1)
        assert desc(items) == [(2, True)]
        assert col.source.stats.engine_restarts == 0


async def test_reconnect_without_replay_socket_is_treated_as_a_restart() -> None:
    async with rig(replay=False) as (pub, col):
        for _ in range(2):
            await pub.publish()
        assert desc(await col.take(2)) == [(0, False), (1, False)]
        await pub.rebind_pub()
        assert desc(await col.take(1)) == ["engine_restart"]
        await pub.subscribed_again()
        await pub.publish()  # seq 2: as a new engine's, batches 0..1 were never seen
        assert desc(await col.take(2)) == ["events_lost", (2, False)]
        assert col.source.health.state is IndexState.PARTIAL
        assert col.source.stats.events_lost == 1
