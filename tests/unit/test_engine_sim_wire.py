"""engine_sim KV events: vLLM's wire format decoded back, live PUB frames, replay over ROUTER."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from engine_sim.cache import AllBlocksCleared, BlockRemoved, BlockStored, EngineHasher, hash_to_int
from engine_sim.events import END_SEQ, EventEncoder, KVEventPublisher

WireHash = int | bytes


# ---- a tiny consumer-side decoder, written from vLLM's published structs ----------------
class MStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[WireHash]
    parent_block_hash: WireHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class MRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[WireHash]
    medium: str | None = None


class MCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class PStored(MStored, array_like=True, tag="BlockStored"):
    pass


class PRemoved(MRemoved, array_like=True, tag="BlockRemoved"):
    pass


class PCleared(MCleared, array_like=True, tag="AllBlocksCleared"):
    pass


class MapBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[MStored | MRemoved | MCleared]
    data_parallel_rank: int | None = None


class PosBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[PStored | PRemoved | PCleared]
    data_parallel_rank: int | None = None


H = EngineHasher(5)
HS = H.hash_blocks(list(range(8)), 4)
EVENTS = [BlockStored(tuple(HS), None, tuple(range(8)), 4), BlockRemoved((HS[1],)),
          AllBlocksCleared()]


@pytest.mark.parametrize("encoding", ["map", "positional"])
@pytest.mark.parametrize("hash_type", ["int", "bytes"])
def test_batches_decode_back_with_a_vllm_shaped_decoder(encoding: str, hash_type: str) -> None:
    payload = EventEncoder(encoding, hash_type, 0).encode(EVENTS, ts=12.5)
    cls: type[MapBatch] | type[PosBatch] = MapBatch if encoding == "map" else PosBatch
    batch = msgspec.msgpack.decode(payload, type=cls)
    assert batch.ts == 12.5 and batch.data_parallel_rank == 0
    stored, removed, cleared = batch.events
    want = [hash_to_int(h) for h in HS] if hash_type == "int" else HS
    assert isinstance(stored, MStored) and isinstance(removed, MRemoved)
    assert stored.block_hashes == want and stored.parent_block_hash is None
    assert stored.token_ids == list(range(8)) and stored.block_size == 4
    assert stored.medium == "GPU" and stored.lora_id is None and stored.lora_name is None
    assert removed.block_hashes == [want[1]] and removed.medium == "GPU"
    assert isinstance(cleared, MCleared)


def test_map_encoding_field_names_and_order_match_vllm() -> None:
    raw: Any = msgspec.msgpack.decode(EventEncoder("map", "int", 0).encode(EVENTS, ts=1.0))
    assert isinstance(raw, list) and len(raw) == 3  # [ts, events, data_parallel_rank]
    stored, removed, cleared = raw[1]
    assert list(stored) == ["type", "block_hashes", "parent_block_hash", "token_ids",
                            "block_size", "lora_id", "medium", "lora_name"]
    assert list(removed) == ["type", "block_hashes", "medium"]
    assert cleared == {"type": "AllBlocksCleared"}
    # hashes >= 2**63 travel as msgpack uint64
    big = EventEncoder("map", "int", 0).encode([BlockRemoved((b"\xff" * 32,))], ts=1.0)
    assert msgspec.msgpack.decode(big)[1][0]["block_hashes"] == [2**64 - 1]


def test_positional_encoding_has_the_tag_first() -> None:
    raw: Any = msgspec.msgpack.decode(EventEncoder("positional", "int", None).encode(EVENTS, 1.0))
    assert raw[2] is None
    assert raw[1][0][0] == "BlockStored" and raw[1][0][3] == list(range(8))
    assert raw[1][1] == ["BlockRemoved", [hash_to_int(HS[1])], "GPU"]
    assert raw[1][2] == ["AllBlocksCleared"]


async def _recv(sock: zmq.asyncio.Socket, wait_s: float = 3.0) -> list[bytes]:
    frames: list[bytes] = await asyncio.wait_for(sock.recv_multipart(), wait_s)
    return frames


async def _replay(ctx: zmq.asyncio.Context, endpoint: str, start: int) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            frames = await _recv(dealer)
            out.append(frames)
            if END_SEQ in frames:
                return out
    finally:
        dealer.close()


async def test_pub_frames_seq_from_zero_and_replay() -> None:
    pub = KVEventPublisher(EventEncoder("map", "int", 0), "tcp://127.0.0.1:0",
                           "tcp://127.0.0.1:0", topic="kv@sim", buffer_steps=3)
    pub.start()
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.bound_endpoint)
    try:
        # PUB/SUB join asynchronously: publish probes until the subscriber sees one
        deadline = time.monotonic() + 5
        first: list[bytes] | None = None
        while first is None and time.monotonic() < deadline:
            pub.publish([AllBlocksCleared()])
            try:
                first = await _recv(sub, 0.1)
            except TimeoutError:
                continue
        assert first is not None and first[0] == b"kv@sim" and len(first) == 3
        start_seq = int.from_bytes(first[1], "big")
        for _ in range(5):
            pub.publish(EVENTS[:1])
        assert pub.publish([]) is None  # empty steps publish nothing
        seqs = [start_seq]
        while seqs[-1] != pub.next_seq - 1:
            seqs.append(int.from_bytes((await _recv(sub))[1], "big"))
        assert seqs == list(range(start_seq, pub.next_seq))
        # the very first batch of a publisher is seq 0
        assert pub.next_seq - 1 >= 5 and pub.batches_total == pub.next_seq

        last = pub.next_seq - 1
        replies = await _replay(ctx, pub.bound_replay_endpoint, last - 1)
        assert [r[2] for r in replies[:-1]] == [(last - 1).to_bytes(8, "big"),
                                                last.to_bytes(8, "big")]
        assert all(r[0] == b"" and r[1] == b"kv@sim" and len(r) == 4 for r in replies[:-1])
        assert replies[-1] == [b"", b"", END_SEQ, b""]
        decoded = msgspec.msgpack.decode(replies[0][3], type=MapBatch)
        assert isinstance(decoded.events[0], MStored)

        # older than the buffer (3 batches): like vLLM, only what is left, then the end marker
        replies = await _replay(ctx, pub.bound_replay_endpoint, 0)
        assert [int.from_bytes(r[2], "big") for r in replies[:-1]] == [last - 2, last - 1, last]
        # a malformed request is ignored and the socket keeps serving
        bad = ctx.socket(zmq.DEALER)
        bad.connect(pub.bound_replay_endpoint)
        await bad.send_multipart([b"", b"\x01\x02"])
        bad.close(linger=0)
        assert len(await _replay(ctx, pub.bound_replay_endpoint, last)) == 2
        assert pub.replay_requests_total == 3
    finally:
        sub.close()
        ctx.term()
        await pub.stop()


async def test_legacy_replay_form_has_no_topic_frame() -> None:
    pub = KVEventPublisher(EventEncoder("positional", "bytes", 0), "", "tcp://127.0.0.1:0",
                           topic="t", replay_form="legacy")
    pub.start()
    ctx = zmq.asyncio.Context()
    try:
        pub.publish(EVENTS)
        replies = await _replay(ctx, pub.bound_replay_endpoint, 0)
        assert replies[0][:2] == [b"", (0).to_bytes(8, "big")] and len(replies[0]) == 3
        assert replies[-1] == [b"", END_SEQ, b""]
        batch = msgspec.msgpack.decode(replies[0][2], type=PosBatch)
        assert isinstance(batch.events[0], PStored) and batch.events[0].block_hashes == HS
    finally:
        ctx.term()
        await pub.stop()
