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

At start, with a replay socket, the source asks for every batch from 0 at once (before any
live batch), so an agent that starts next to an engine that is already idle still learns what
it cached (as far as the buffer reaches). Malformed frames are counted and skipped; nothing
raises out of :meth:`items`.

The source also keeps the node's :class:`~node_agent.events.IndexHealth` (sent with every
heartbeat, so the router can weigh it): ``NO_EVENTS`` until a usable batch arrives,
``COMPLETE`` when every batch since the engine's start is known, ``PARTIAL`` with a note when
some never will be (joined late without replay, an engine restart whose first batches were
published before the agent reconnected, a gap older than the buffer). The SUB socket takes
every topic and filters here, so batches under another topic are counted and named in the log
and in the note instead of vanishing in ZMQ's subscription filter.
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
    IndexHealth,
    IndexState,
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
    topic_mismatches: int = 0
    late_joins: int = 0


class ZmqEventSource:
    """An :class:`~node_agent.events.EventSource` over an engine's ZMQ PUB (+ ROUTER replay)."""

    def __init__(self, endpoint: str, parser: PayloadParser, *, replay_endpoint: str = "",
                 topic: str = "", replay_timeout_s: float = 2.0, hwm: int = 100_000,
                 health: IndexHealth | None = None) -> None:
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
        self._after_restart = False
        self._replay_answered = False
        self._first_replayed = 0
        self._foreign_topics: set[bytes] = set()
        self.health = health if health is not None else IndexHealth()
        self.stats = SourceStats()

    def _connect(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self._hwm)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")  # filtered in _on_frames, so mismatches are seen
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
            async for item in self._initial_replay():
                yield item
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
                if not frames[0].startswith(self._topic):
                    self._foreign_topic(frames[0])
                    continue
                async for item in self._on_live(int.from_bytes(frames[1], "big"), frames[2]):
                    yield item
        finally:
            with contextlib.suppress(zmq.ZMQError):
                if self._sub is not None:
                    self._sub.disable_monitor()
            monitor.close(linger=0)

    def _foreign_topic(self, topic: bytes) -> None:
        self.stats.topic_mismatches += 1
        shown = topic[:120].decode("utf-8", "replace")
        want = self._topic.decode("utf-8", "replace")
        if topic not in self._foreign_topics and len(self._foreign_topics) < 16:
            self._foreign_topics.add(topic)
            log.warning("engine batch with topic %r ignored: --topic is %r (set --topic to the "
                        "engine's kv-events-config topic)", shown, want)
        if not self.stats.live_batches:  # not one live batch under our topic yet
            # (replies without a topic frame, vLLM before PR #45177, may have been applied)
            state = IndexState.PARTIAL if self.stats.replayed_batches else IndexState.NO_EVENTS
            self.health.set(state, f"batches arrive with topic {shown!r} but --topic is "
                            f"{want!r}: ignored ({self.stats.topic_mismatches} so far)")

    async def _initial_replay(self) -> AsyncIterator[SourceItem]:
        """Ask for every buffered batch at start (the engine may be idle already)."""
        if self._dealer is None:
            return
        self._expected = 0
        async for item in self._replay(0, count=False):
            yield item
        if not self._replay_answered:
            self._expected = None  # engine not up yet: the first live batch decides
            return
        if self.stats.topic_mismatches and not self.stats.replayed_batches:
            return  # only batches under another topic: stays NO_EVENTS, named in the note
        if self._covered or self._expected == 0:
            self.health.set(IndexState.COMPLETE)
            if self._expected:
                log.info("replayed %d engine batches published before the agent started",
                         self._expected)
        else:
            self.stats.late_joins += 1
            self._partial(f"joined late: engine batches before seq {self._first_replayed} are "
                          "older than its replay buffer; blocks cached then stay unknown until "
                          "stored again")

    def _partial(self, note: str) -> None:
        log.warning("index incomplete: %s", note)
        self.health.set(IndexState.PARTIAL, note)

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
            self._after_restart = True
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
        self._after_replay_from_0("engine restarted")

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
            # [empty, topic, seq, payload] (vLLM >= PR #45177, SGLang) or [topic, seq, payload]
            topic = frames[-3] if len(frames) >= 4 or (len(frames) == 3 and frames[0]) else None
            if topic is not None and not topic.startswith(self._topic):
                self._foreign_topic(topic)
                continue
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

    def _after_replay_from_0(self, why: str) -> None:
        if self._covered:
            self.health.set(IndexState.COMPLETE)
        else:
            self._partial(f"{why}: its first batches could not be replayed")

    async def _on_live(self, seq: int, payload: bytes) -> AsyncIterator[SourceItem]:
        if self._last_live is not None and seq <= self._last_live:
            self.stats.engine_restarts += 1
            log.warning("engine event sequence went back from %d to %d: engine restarted, "
                        "dropping its blocks", self._last_live, seq)
            yield SourceSignal(SignalKind.ENGINE_RESTART, f"seq {self._last_live} -> {seq}")
            self._expected = 0
            if seq == 0:
                self.health.set(IndexState.COMPLETE)
        self._last_live = seq
        late_join = self._expected is None
        if self._expected is None:
            self._expected = 0 if (seq > 0 and self._dealer is not None) else seq
            if self._expected < seq:
                log.info("first engine batch is seq %d: replaying from 0 to learn earlier "
                         "blocks", seq)
            elif seq == 0:
                self.health.set(IndexState.COMPLETE)
            elif self._after_restart:  # no replay socket: the new engine's first batches
                self.stats.events_lost += 1
                self._partial(f"engine restarted and published batches 0..{seq - 1} before "
                              "the agent reconnected; no --engine-replay to fetch them")
                yield SourceSignal(SignalKind.EVENTS_LOST, f"{seq} batches from seq 0")
            else:
                self.stats.late_joins += 1
                self._partial(f"joined late: first engine batch seen is seq {seq} and there is "
                              "no --engine-replay; blocks cached before stay unknown until "
                              "stored again")
            self._after_restart = False
        if seq > self._expected:
            start = self._expected
            if not late_join:
                self.stats.gaps += 1
            async for item in self._replay(start):
                yield item
            if not self._covered:
                self._expected = max(self._expected, seq)
                if late_join:
                    self.stats.late_joins += 1
                    self._partial(f"joined late: engine batches before seq {seq} are no longer "
                                  "replayable; blocks cached then stay unknown until stored "
                                  "again")
                else:
                    self.stats.events_lost += 1
                    self._partial(f"batches {start}..{seq - 1} could not be replayed (older "
                                  "than the engine's buffer, or no replay socket)")
                    yield SourceSignal(SignalKind.EVENTS_LOST,
                                       f"{seq - start} batches from seq {start}")
            elif start == 0:
                self.health.set(IndexState.COMPLETE)
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

    async def _replay(self, start: int, *, count: bool = True) -> AsyncIterator[SourceItem]:
        """Ask for batches from ``start``; yield those we lack; set ``_covered``. ``count``:
        False for the replay at start (not a recovery; its batches still count as replayed)."""
        self._covered = False
        self._replay_answered = False
        dealer = self._dealer
        if dealer is None:
            return
        self.stats.replays += int(count)
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        first = True
        while True:
            reply = await self._recv_reply(dealer)
            if reply is not None:
                self._replay_answered = True
            if not isinstance(reply, tuple):
                return
            seq, payload = reply
            if first:
                first = False
                self._first_replayed = seq
                self._covered = seq <= start
            assert self._expected is not None
            if seq >= self._expected:
                async for item in self._deliver(seq, payload):
                    yield item
