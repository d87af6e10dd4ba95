"""Replays KV-event payloads recorded from the engines' own code (tests/golden/engine_events).

A :class:`GoldenEngine` binds a PUB (XPUB, to see subscriptions) and a ROUTER replay socket on
loopback and sends the recorded frames byte for byte, in order. Replay replies are framed as
the engine framed them: the shape is read from the engine's recorded replies, and
:meth:`GoldenEngine.check_replay_framing` proves the synthesized replies equal the recorded ones.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from kvroute.procs import free_port

GOLDEN = Path(__file__).resolve().parent / "golden" / "engine_events"
END_SEQ = b"\xff" * 8
ENGINES = ("vllm-0.33.0", "vllm-0.23.0", "vllm-0.9.0", "sglang-0.5.23", "sglang-0.4.10.post2")


@dataclass
class Recording:
    """One recorded scenario."""

    engine: str
    scenario: str
    live: list[list[bytes]]
    incarnation: list[int]
    replays: list[dict[str, Any]]
    prov: dict[str, Any]

    @property
    def probes(self) -> list[dict[str, Any]]:
        """Prompts with the engine's own reusable-token count."""
        return list(self.prov["probes"])

    @property
    def topic(self) -> bytes:
        """The engine's topic (from its frames)."""
        return self.live[0][0]

    def frames(self, incarnation: int) -> list[list[bytes]]:
        """Live messages of one engine incarnation, in order."""
        return [f for f, i in zip(self.live, self.incarnation, strict=True) if i == incarnation]


def engine_tiers(probe: dict[str, Any]) -> tuple[int, int]:
    """(GPU tokens, offloaded tokens after them) the engine's own cache code reuses for a probe:
    its device prefix hit, then what its offloading media (``engine_hit_tokens_<MEDIUM>``, each a
    prefix hit of that medium's pool) hold beyond it."""
    gpu = int(probe["engine_hit_tokens"])
    lower = max((int(v) for k, v in probe.items() if k.startswith("engine_hit_tokens_")),
                default=0)
    return gpu, max(0, lower - gpu)


def load(engine: str, scenario: str) -> Recording:
    """A recording and its provenance."""
    d = msgspec.msgpack.decode((GOLDEN / engine / f"{scenario}.msgpack").read_bytes())
    prov = json.loads((GOLDEN / engine / f"{scenario}.json").read_text())
    return Recording(engine, scenario, d["live"], d["live_incarnation"], d["replays"], prov)


def scenarios(engine: str) -> list[str]:
    """Recorded scenario names of an engine."""
    return sorted(p.stem for p in (GOLDEN / engine).glob("*.msgpack"))


def reply_shape(engine: str) -> tuple[bool, bool]:
    """(data replies carry the topic frame, end marker carries an empty topic frame), from any
    replay the engine answered in the recordings."""
    for sc in scenarios(engine):
        for rep in load(engine, sc).replays:
            replies = rep["replies"]
            if len(replies) >= 2:
                return len(replies[0]) == 4, len(replies[-1]) == 4
    raise AssertionError(f"no recorded replay for {engine}")


@dataclass
class GoldenEngine:
    """Publishes a recording's frames on loopback like the engine did."""

    rec: Recording
    with_topic: bool
    end_with_topic: bool
    pub_port: int = field(default_factory=free_port)
    replay_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.ctx = zmq.Context()
        self.buffer: list[tuple[int, bytes, bytes]] = []
        self.lock = threading.Lock()
        self.replay_requests: list[int] = []
        self._stop = threading.Event()
        self.pub = self._bind_pub()
        self._thread = threading.Thread(target=self._serve_replay, daemon=True)
        self._thread.start()

    def _bind_pub(self) -> zmq.Socket[bytes]:
        pub = self.ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(f"tcp://127.0.0.1:{self.pub_port}")
        return pub

    @property
    def events_endpoint(self) -> str:
        """Where agents subscribe."""
        return f"tcp://127.0.0.1:{self.pub_port}"

    @property
    def replay_endpoint(self) -> str:
        """The replay ROUTER."""
        return f"tcp://127.0.0.1:{self.replay_port}"

    def wait_subscribed(self, timeout_s: float = 20.0) -> None:
        """Until a subscriber (the agent) connected to the current PUB socket."""
        if not self.pub.poll(int(timeout_s * 1000)):
            raise AssertionError(f"{self.rec.scenario}: no subscriber within {timeout_s} s")
        self.pub.recv()

    def wait_replay_request(self, n: int = 1, timeout_s: float = 20.0) -> None:
        """Until ``n`` replay requests arrived."""
        deadline = time.monotonic() + timeout_s
        while len(self.replay_requests) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.rec.scenario}: {n} replay request(s) not seen")
            time.sleep(0.02)
        time.sleep(0.2)  # the answer is on its way

    def send(self, frames: list[bytes], *, heard: bool = True) -> None:
        """Publish one recorded message (``heard=False``: into the buffer only, as a batch
        published while nobody listened)."""
        topic, seq_b, payload = frames
        with self.lock:
            self.buffer.append((int.from_bytes(seq_b, "big"), topic, payload))
        if heard:
            self.pub.send_multipart(frames)

    def restart(self) -> None:
        """A new engine incarnation: PUB socket re-created, replay buffer emptied."""
        self.pub.close(0)
        with self.lock:
            self.buffer.clear()
        time.sleep(0.5)  # the agent notices the disconnect
        self.pub = self._bind_pub()

    def replies(self, start: int) -> list[list[bytes]]:
        """The replay answer for ``start`` in the engine's framing."""
        out = []
        with self.lock:
            for seq, topic, payload in self.buffer:
                if seq >= start:
                    head = [b"", topic] if self.with_topic else [b""]
                    out.append([*head, seq.to_bytes(8, "big"), payload])
        out.append([b"", b"", END_SEQ, b""] if self.end_with_topic else [b"", END_SEQ, b""])
        return out

    def _serve_replay(self) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(self.replay_endpoint)
        try:
            while not self._stop.is_set():
                if not router.poll(100):
                    continue
                ident, _empty, start_b = router.recv_multipart()
                start = int.from_bytes(start_b, "big")
                self.replay_requests.append(start)
                for frames in self.replies(start):
                    router.send_multipart([ident, *frames])
        finally:
            router.close(0)

    def close(self) -> None:
        """Stop the replay thread and close the sockets."""
        self._stop.set()
        self._thread.join(5)
        self.pub.close(0)
        self.ctx.term()


def check_replay_framing(rec: Recording, with_topic: bool, end_with_topic: bool) -> None:
    """The synthesized replay replies equal every recorded reply of ``rec``, byte for byte."""
    for rep in rec.replays:
        eng = GoldenEngine.__new__(GoldenEngine)
        eng.rec, eng.with_topic, eng.end_with_topic = rec, with_topic, end_with_topic
        eng.lock = threading.Lock()
        eng.buffer = [(int.from_bytes(f[1], "big"), f[0], f[2])
                      for f, inc in zip(rec.live, rec.incarnation, strict=True)
                      if inc == rep["incarnation"]]
        assert eng.replies(rep["start"]) == rep["replies"], (rec.engine, rec.scenario)
