"""KV cache events on ZMQ in vLLM's wire format (``vllm/distributed/kv_events.py``).

Live messages (PUB): three frames ``[topic, seq, payload]``; ``seq`` is 8 bytes big-endian from a
counter that starts at 0 in every process; ``payload`` is msgpack of the batch
``[ts, [events...], data_parallel_rank]`` (a positional array, as vLLM's array-like
``EventBatch``).

Events, two encodings (``encoding`` setting):

- ``map`` (vLLM >= 0.26, the default): a map whose ``"type"`` holds the tag, fields by name in
  vLLM's order; fields with a default are omitted when they hold it (msgspec ``omit_defaults``),
  fields without one (``lora_id``, ``medium``, ``lora_name``) are always present.
- ``positional`` (older vLLM): an array with the tag first, then the fields in order.

Hashes (``hash_type``): ``int`` = the digest's last 8 bytes as a uint64 (vLLM's default,
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``), ``bytes`` = the raw 32-byte digest.

Replay (ROUTER): a DEALER sends ``[b"", start_seq(8 bytes)]``; the reply is one message per
buffered batch with seq >= start, then the end marker (seq = eight 0xFF bytes, empty payload).
``replay_form="topic"`` (vLLM >= PR #45177): ``[b"", topic, seq, payload]`` and end marker
``[b"", b"", END, b""]``; ``"legacy"``: ``[b"", seq, payload]`` and ``[b"", END, b""]``. Batches
older than the buffer are simply not in the reply (as in vLLM); the client sees the first seq it
gets is past the one it asked for, and must resync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence

import msgspec
import zmq
import zmq.asyncio

from engine_sim.cache import (
    AllBlocksCleared,
    BlockId,
    BlockRemoved,
    BlockStored,
    CacheEvent,
    hash_to_int,
)
from kvroute.aio import cancel_and_wait

log = logging.getLogger(__name__)

END_SEQ = b"\xff" * 8
"""Sequence frame of the replay end marker (-1 as 8 bytes)."""

MEDIUM_GPU = "GPU"

WireHash = int | bytes


class _MapEvent(msgspec.Struct, tag=True, omit_defaults=True):
    pass


class MapBlockStored(_MapEvent, tag="BlockStored"):
    """``BlockStored`` as vLLM >= 0.26 encodes it (a tagged map)."""

    block_hashes: list[WireHash]
    parent_block_hash: WireHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class MapBlockRemoved(_MapEvent, tag="BlockRemoved"):
    """``BlockRemoved`` as a tagged map."""

    block_hashes: list[WireHash]
    medium: str | None


class MapAllBlocksCleared(_MapEvent, tag="AllBlocksCleared"):
    """``AllBlocksCleared`` as a tagged map (only the type)."""


class _PosEvent(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    pass


class PosBlockStored(_PosEvent, tag="BlockStored"):
    """``BlockStored`` as older vLLM encodes it (an array, tag first)."""

    block_hashes: list[WireHash]
    parent_block_hash: WireHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class PosBlockRemoved(_PosEvent, tag="BlockRemoved"):
    """``BlockRemoved`` as an array."""

    block_hashes: list[WireHash]
    medium: str | None


class PosAllBlocksCleared(_PosEvent, tag="AllBlocksCleared"):
    """``AllBlocksCleared`` as an array (only the tag)."""


class WireBatch(msgspec.Struct, array_like=True):
    """``[ts, events, data_parallel_rank]``."""

    ts: float
    events: list[msgspec.Struct]
    data_parallel_rank: int | None


class EventEncoder:
    """Encodes cache events into one msgpack batch payload."""

    def __init__(self, encoding: str = "map", hash_type: str = "int",
                 data_parallel_rank: int | None = 0) -> None:
        if encoding not in ("map", "positional"):
            raise ValueError(f"encoding must be map or positional, got {encoding!r}")
        if hash_type not in ("int", "bytes"):
            raise ValueError(f"hash_type must be int or bytes, got {hash_type!r}")
        self.encoding = encoding
        self.hash_type = hash_type
        self.data_parallel_rank = data_parallel_rank
        self._enc = msgspec.msgpack.Encoder()

    def _h(self, block: BlockId) -> WireHash:
        if isinstance(block, int):  # a precomputed uint64 id (in-process bench caches)
            return block if self.hash_type == "int" else block.to_bytes(8, "big")
        return hash_to_int(block) if self.hash_type == "int" else block

    def _event(self, ev: CacheEvent) -> msgspec.Struct:
        pos = self.encoding == "positional"
        if isinstance(ev, BlockStored):
            parent = None if ev.parent_block_hash is None else self._h(ev.parent_block_hash)
            cls_s = PosBlockStored if pos else MapBlockStored
            return cls_s(block_hashes=[self._h(h) for h in ev.block_hashes],
                         parent_block_hash=parent, token_ids=list(ev.token_ids),
                         block_size=ev.block_size, lora_id=None, medium=MEDIUM_GPU,
                         lora_name=None)
        if isinstance(ev, BlockRemoved):
            cls_r = PosBlockRemoved if pos else MapBlockRemoved
            return cls_r(block_hashes=[self._h(h) for h in ev.block_hashes], medium=MEDIUM_GPU)
        if isinstance(ev, AllBlocksCleared):
            return PosAllBlocksCleared() if pos else MapAllBlocksCleared()
        raise TypeError(f"not a cache event: {ev!r}")

    def encode(self, events: Sequence[CacheEvent], ts: float | None = None) -> bytes:
        """msgpack of ``[ts, [events...], data_parallel_rank]``."""
        batch = WireBatch(ts=time.time() if ts is None else ts,
                          events=[self._event(e) for e in events],
                          data_parallel_rank=self.data_parallel_rank)
        return self._enc.encode(batch)


def _bind(sock: zmq.asyncio.Socket, endpoint: str) -> str:
    """Bind ``endpoint`` (``tcp://HOST:0`` = a free port) and return the bound endpoint."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        endpoint = endpoint[:-1] + "*"
    sock.bind(endpoint)
    bound = sock.getsockopt(zmq.LAST_ENDPOINT)
    return bound.decode() if isinstance(bound, bytes) else str(bound)


def endpoint_port(endpoint: str) -> int | None:
    """TCP port of a bound endpoint, or None for ipc/inproc."""
    if not endpoint.startswith("tcp://"):
        return None
    return int(endpoint.rsplit(":", 1)[1])


class KVEventPublisher:
    """PUB socket + replay ROUTER + ring buffer of the last ``buffer_steps`` batches."""

    def __init__(self, encoder: EventEncoder, endpoint: str, replay_endpoint: str = "",
                 topic: str = "", buffer_steps: int = 10000, hwm: int = 100000,
                 replay_form: str = "topic") -> None:
        if replay_form not in ("topic", "legacy"):
            raise ValueError(f"replay_form must be topic or legacy, got {replay_form!r}")
        self.encoder = encoder
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic.encode("utf-8")
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._hwm = hwm
        self._replay_form = replay_form
        self._seq = 0
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._pub_sync: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.bound_endpoint = ""
        self.bound_replay_endpoint = ""
        self.batches_total = 0
        self.events_total = 0
        self.replay_requests_total = 0

    @property
    def next_seq(self) -> int:
        """Sequence number the next batch will carry."""
        return self._seq

    def start(self) -> None:
        """Bind the sockets and start answering replay requests (call inside the event loop)."""
        self._ctx = zmq.asyncio.Context()
        if self._endpoint:
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, self._hwm)
            self._pub.setsockopt(zmq.LINGER, 0)
            self.bound_endpoint = _bind(self._pub, self._endpoint)
            # a synchronous view of the same socket: PUB never blocks, and errors surface here
            # instead of in an un-awaited future
            self._pub_sync = zmq.Socket.shadow(self._pub.underlying)
        if self._replay_endpoint:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self.bound_replay_endpoint = _bind(self._router, self._replay_endpoint)
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: Sequence[CacheEvent], ts: float | None = None) -> int | None:
        """Send one batch (if ``events`` is non-empty); returns its seq. Never blocks."""
        if not events:
            return None
        payload = self.encoder.encode(events, ts)
        seq = self._seq
        self._seq += 1
        seq_bytes = seq.to_bytes(8, "big")
        self._buffer.append((seq, payload))
        self.batches_total += 1
        self.events_total += len(events)
        if self._pub_sync is not None:
            try:
                # PUB drops at the high-water mark instead of blocking; the replay buffer has it.
                self._pub_sync.send_multipart([self._topic, seq_bytes, payload],
                                              flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("KV event batch %d not sent: %s", seq, exc)
        return seq

    def replay_frames(self, start_seq: int) -> list[list[bytes]]:
        """The reply frames (after the identity) for a replay request from ``start_seq``."""
        out: list[list[bytes]] = []
        topic_form = self._replay_form == "topic"
        for seq, payload in self._buffer:
            if seq >= start_seq:
                seq_b = seq.to_bytes(8, "big")
                out.append([b"", self._topic, seq_b, payload] if topic_form
                           else [b"", seq_b, payload])
        out.append([b"", b"", END_SEQ, b""] if topic_form else [b"", END_SEQ, b""])
        return out

    async def _serve_replay(self) -> None:
        assert self._router is not None
        while True:
            try:
                frames = await self._router.recv_multipart()
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except zmq.ZMQError as exc:
                log.warning("replay socket error: %s", exc)
                continue
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                log.warning("invalid replay request (%d frames); expected [empty, 8-byte seq]",
                            len(frames) - 1)
                continue
            client, start = frames[0], int.from_bytes(frames[2], "big")
            self.replay_requests_total += 1
            for reply in self.replay_frames(start):
                try:
                    await self._router.send_multipart([client, *reply])
                except zmq.ZMQError as exc:
                    log.warning("replay reply to client failed: %s", exc)
                    break

    async def stop(self) -> None:
        """Close the sockets."""
        task, self._task = self._task, None
        try:
            await cancel_and_wait(task)
        finally:  # also when the caller is cancelled while waiting
            self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None
        self._pub_sync = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
