"""Engine KV events over ZMQ (vLLM and SGLang publishers), in order, with gap recovery.

Live stream: a SUB socket receiving ``[topic, seq(8 bytes BE), payload]``. Sequence handling:

- ``seq == expected``: the next batch.
- ``seq > expected``: a gap. The missing batches are asked for on the replay socket (DEALER;
  request ``[empty, start(8 bytes BE)]``; replies ``[seq, payload]``, ``[topic, seq, payload]``
  or either with a leading empty delimiter, until the end marker seq = -1). A replay that starts
  above the requested seq, answers nothing, or times out means the gap is older than the
  engine's buffer: :attr:`SignalKind.EVENTS_LOST` is yielded (the agent then resyncs).
- a live seq not above the previous live seq: the publisher restarted (its counter starts at
  0 again). :attr:`SignalKind.ENGINE_RESTART` is yielded before the new incarnation's batches,
  and anything it already published before we saw it is replayed from 0.
- ``seq < expected`` otherwise: already delivered by a replay; skipped.

On the first batch with ``seq > 0`` the source replays from 0, so an agent that starts after
its engine still learns what the engine cached earlier (as far as the buffer reaches).
Malformed frames are counted and skipped; nothing raises out of :meth:`items`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from node_agent.events import (
    EngineBatch,
    PayloadParser,
    SignalKind,
    SourceItem,
    SourceSignal,
)

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""Replay end marker: seq -1 as 8 bytes."""


@dataclass
class SourceStats:
    """Counters of a ZMQ source (exported as metrics)."""

    live_batches: int = 0
    replayed_batches: int = 0
    gaps: int = 0
    replays: int = 0
    replays_failed: int = 0
    events_lost: int = 0
    engine_restarts: int = 0
    reconnects: int = 0
    duplicates: int = 0
    bad_frames: int = 0
    unparsable_batches: int = 0
    last_seq: int = -1
    lag_s: float = 0.0


class ZmqEventSource:
    """An :class:`~node_agent.events.EventSource` over an engine's ZMQ PUB (+ ROUTER replay)."""

    def __init__(self, endpoint: str, parser: PayloadParser, *, replay_endpoint: str = "",
                 topic: str = "", replay_timeout_s: float = 2.0, hwm: int = 100_000) -> None:
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic.encode()
        self._parser = parser
        self._timeout_ms = int(replay_timeout_s * 1000)
        self._hwm = hwm
        self._ctx = zmq.asyncio.Context()
        self._sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._expected: int | None = None
        self._last_live: int | None = None
        self._covered = False
        self._last_ts: float | None = None
        self.stats = SourceStats()

    def _connect(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self._hwm)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        sub.connect(self._endpoint)
        self._sub = sub

    def _new_dealer(self) -> zmq.asyncio.Socket | None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None
        if self._replay_endpoint:
            d = self._ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(self._replay_endpoint)
            self._dealer = d
        return self._dealer

    async def close(self) -> None:
        """Close the sockets and the context."""
        self._sub = self._dealer = None
        self._ctx.destroy(linger=0)  # closes every socket (monitor included), then terminates

    async def items(self) -> AsyncIterator[SourceItem]:
        """Batches and signals in order, until the source is closed or the task cancelled."""
        self._connect()
        self._new_dealer()
        assert self._sub is not None
        monitor = self._sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        poller = zmq.asyncio.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        was_disconnected = False
        try:
            while True:
                try:
                    ready = dict(await poller.poll())
                    if monitor in ready:
                        event = parse_monitor_message(await monitor.recv_multipart())
                        if event["event"] == zmq.EVENT_DISCONNECTED:
                            was_disconnected = True
                            log.warning("engine event stream disconnected; reconnecting")
                        elif event["event"] == zmq.EVENT_CONNECTED and was_disconnected:
                            was_disconnected = False
                            async for item in self._after_reconnect():
                                yield item
                    if self._sub not in ready:
                        continue
                    frames = await self._sub.recv_multipart(copy=True)
                except zmq.ZMQError as exc:
                    if exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                        return
                    raise
                if len(frames) != 3 or len(frames[1]) != 8:
                    self._bad_frame(f"live message with {len(frames)} frames")
                    continue
                async for item in self._on_live(int.from_bytes(frames[1], "big"), frames[2]):
                    yield item
        finally:
            with contextlib.suppress(zmq.ZMQError):
                if self._sub is not None:
                    self._sub.disable_monitor()
            monitor.close(linger=0)

    async def _after_reconnect(self) -> AsyncIterator[SourceItem]:
        """After the PUB connection came back: same engine (fetch what we missed) or a new
        incarnation whose first batches we may have missed (signal a restart, replay from 0).
        Tells them apart by asking for the last batch we processed and comparing its ts."""
        if self._expected is None or self._expected == 0:
            return
        self.stats.reconnects += 1
        dealer = self._dealer
        if dealer is None:
            # Cannot ask the engine; beside the engine a lost connection is a restart.
            self.stats.engine_restarts += 1
            log.warning("engine event stream reconnected and there is no replay socket to "
                        "check the engine: treating it as a restart")
            yield SourceSignal(SignalKind.ENGINE_RESTART, "reconnect without replay socket")
            self._expected, self._last_live = None, None
            return
        last = self._expected - 1
        await dealer.send_multipart([b"", last.to_bytes(8, "big")])
        reply = await self._recv_reply(dealer)
        if reply is None:
            return
        same = False
        if isinstance(reply, tuple):
            seq, payload = reply
            batch = self._parser.parse(payload) if seq == last else None
            same = batch is not None and batch.ts == self._last_ts
        while isinstance(reply, tuple):
            if same and reply[0] >= self._expected:
                async for item in self._deliver(*reply):
                    yield item
            reply = await self._recv_reply(dealer)
        if same:
            return
        self.stats.engine_restarts += 1
        log.warning("engine event stream reconnected to a new engine incarnation (seq %d is "
                    "not the batch we saw): dropping its blocks", last)
        yield SourceSignal(SignalKind.ENGINE_RESTART, "new incarnation after reconnect")
        self._expected, self._last_live = 0, None
        async for item in self._replay(0):
            yield item

    async def _recv_reply(self, dealer: zmq.asyncio.Socket,
                          ) -> tuple[int, bytes] | bytes | None:
        """One replay reply: (seq, payload), END_SEQ, or None on timeout (socket renewed)."""
        while True:
            if not await dealer.poll(self._timeout_ms):
                self.stats.replays_failed += 1
                log.warning("replay reply not received within %d ms", self._timeout_ms)
                self._new_dealer()  # drop late replies of this request
                return None
            frames = await dealer.recv_multipart(copy=True)
            if len(frames) < 2 or len(frames[-2]) != 8:
                self._bad_frame(f"replay reply with {len(frames)} frames")
                continue
            if frames[-2] == END_SEQ:
                return END_SEQ
            return int.from_bytes(frames[-2], "big"), frames[-1]

    async def _deliver(self, seq: int, payload: bytes) -> AsyncIterator[SourceItem]:
        """Parse and yield a replayed batch."""
        self._expected = seq + 1
        batch = self._parser.parse(payload)
        self.stats.replayed_batches += 1
        if batch is None:
            self.stats.unparsable_batches += 1
            return
        self._last_ts = batch.ts
        yield EngineBatch(seq, batch, replayed=True)

    def _bad_frame(self, detail: str) -> None:
        self.stats.bad_frames += 1
        n = self.stats.bad_frames
        if n <= 5 or (n & (n - 1)) == 0:
            log.warning("skipped malformed ZMQ message (%s; seen %d)", detail, n)

    async def _on_live(self, seq: int, payload: bytes) -> AsyncIterator[SourceItem]:
        if self._last_live is not None and seq <= self._last_live:
            self.stats.engine_restarts += 1
            log.warning("engine event sequence went back from %d to %d: engine restarted, "
                        "dropping its blocks", self._last_live, seq)
            yield SourceSignal(SignalKind.ENGINE_RESTART, f"seq {self._last_live} -> {seq}")
            self._expected = 0
        self._last_live = seq
        late_join = self._expected is None
        if self._expected is None:
            self._expected = 0 if (seq > 0 and self._dealer is not None) else seq
            if self._expected < seq:
                log.info("first engine batch is seq %d: replaying from 0 to learn earlier "
                         "blocks", seq)
        if seq > self._expected:
            start = self._expected
            if not late_join:
                self.stats.gaps += 1
            async for item in self._replay(start):
                yield item
            if not self._covered:
                self._expected = max(self._expected, seq)
                if late_join:
                    log.info("engine batches before seq %d are no longer replayable: blocks "
                             "cached earlier stay unknown until stored again", seq)
                else:
                    self.stats.events_lost += 1
                    log.warning("batches %d..%d could not be replayed (older than the "
                                "engine's buffer, or no replay socket): requesting a resync",
                                start, seq - 1)
                    yield SourceSignal(SignalKind.EVENTS_LOST,
                                       f"{seq - start} batches from seq {start}")
        if seq < self._expected:
            self.stats.duplicates += 1
            return
        batch = self._parser.parse(payload)
        self._expected = seq + 1
        self.stats.last_seq = seq
        self.stats.live_batches += 1
        if batch is None:
            self.stats.unparsable_batches += 1
            return
        self.stats.lag_s = max(0.0, time.time() - batch.ts)
        self._last_ts = batch.ts
        yield EngineBatch(seq, batch)

    async def _replay(self, start: int) -> AsyncIterator[SourceItem]:
        """Ask for batches from ``start``; yield those we lack; set ``_covered``."""
        self._covered = False
        dealer = self._dealer
        if dealer is None:
            return
        self.stats.replays += 1
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        first = True
        while True:
            reply = await self._recv_reply(dealer)
            if not isinstance(reply, tuple):
                return
            seq, payload = reply
            if first:
                first = False
                self._covered = seq <= start
            assert self._expected is not None
            if seq >= self._expected:
                async for item in self._deliver(seq, payload):
                    yield item
