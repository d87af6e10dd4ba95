"""Internal engine events and the event-source interface.

Parsers (:mod:`node_agent.parse_vllm`, :mod:`node_agent.parse_sglang`) turn wire payloads into
these types; sources (:mod:`node_agent.zmq_source`) yield them in sequence order together with
signals about the stream itself (engine restart, an unrecoverable gap). Engine hashes are opaque
unsigned 64-bit ids (see ENGINE_EVENTS.md): they are only used to find a run's parent and to
apply removals, never compared across processes.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

DEVICE_MEDIUM = "GPU"
"""The medium name engines use for the device (GPU HBM) cache; ``None`` on the wire means it."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A run of consecutive blocks entered the engine's cache.

    ``token_ids`` is the concatenation of the run's tokens: block ``i`` holds
    ``token_ids[i*block_size:(i+1)*block_size]``; the last block may be partial (SGLang pages).
    """

    engine_hashes: tuple[int, ...]
    """Engine ids of the blocks, in order (unsigned 64-bit)."""
    parent_engine_hash: int | None
    """Engine id of the block before the run; None when the run starts at block 0."""
    token_ids: tuple[int, ...]
    """Tokens of the run."""
    block_size: int
    """Tokens per engine block (vLLM block_size, SGLang page_size)."""
    medium: str = DEVICE_MEDIUM
    """Where the blocks live (``GPU`` = device cache; ``CPU``, ``DISK``... for offloading)."""
    lora_id: int | None = None
    """LoRA adapter id, when the blocks belong to an adapter."""
    lora_name: str | None = None
    """LoRA adapter name (vLLM from Dec 2025)."""
    cache_salt: str | None = None
    """Per-request cache salt (SGLang ``cache_salt``)."""
    extra_keys: tuple[object, ...] | None = None
    """Per-block extra hash keys kvroute cannot reproduce from a request (multimodal ids,
    prompt-embedding digests), one entry per block (None = none for that block); None when no
    block has any. LoRA names and the cache salt are taken out by the parser (they become the
    run's salt); what is left makes the block and its descendants unmatchable."""
    group_idx: int | None = None
    """KV-cache group of hybrid models (None or 0 = the main group)."""
    lookahead_tokens: int = 0
    """Tokens after each block its engine hash also covers (vLLM ``lookahead_token_ids``)."""


@dataclass(frozen=True, slots=True)
class Removed:
    """Blocks left the engine's cache."""

    engine_hashes: tuple[int, ...]
    """Engine ids of the removed blocks."""
    medium: str = DEVICE_MEDIUM
    """Medium the blocks were removed from."""
    group_idx: int | None = None
    """KV-cache group of hybrid models."""


@dataclass(frozen=True, slots=True)
class Cleared:
    """The engine dropped its whole cache (AllBlocksCleared)."""


Event = Stored | Removed | Cleared
"""One engine cache event."""


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    """A decoded payload: the events the parser could read, in order."""

    ts: float
    """Engine wall-clock time of the batch (seconds since the Unix epoch)."""
    events: tuple[Event, ...]
    """Events of the batch that parsed; bad ones were counted and skipped."""
    dp_rank: int | None = None
    """Data-parallel rank of the publisher (None when absent)."""


@dataclass(frozen=True, slots=True)
class EngineBatch:
    """A batch from an event source, with its sequence number."""

    seq: int
    """Publisher sequence number."""
    batch: ParsedBatch
    """The decoded events."""
    replayed: bool = False
    """True when it came from the replay socket rather than the live stream."""


class IndexState(enum.IntEnum):
    """How complete the agent's view of the engine's cache is (registry.proto IndexState)."""

    COMPLETE = 1
    """Every batch since the engine's cache was last empty has been applied."""
    PARTIAL = 2
    """Batches were missed: blocks the engine holds may be missing from the index."""
    NO_EVENTS = 3
    """No usable batch received yet (idle engine, wrong endpoint or topic)."""


@dataclass
class IndexHealth:
    """The agent's index state and why (sent with every heartbeat)."""

    state: IndexState = IndexState.NO_EVENTS
    """Current state."""
    note: str = "no engine event batch received yet"
    """What the agent saw (empty when complete)."""

    def set(self, state: IndexState, note: str = "") -> None:
        """Change the state."""
        self.state, self.note = state, note[:240]


class SignalKind(enum.Enum):
    """Things a source reports about the stream itself."""

    ENGINE_RESTART = "engine_restart"
    """The sequence went back: a new engine incarnation. Drop the node's blocks now."""
    EVENTS_LOST = "events_lost"
    """A gap could not be replayed (older than the buffer, or no replay socket)."""


@dataclass(frozen=True, slots=True)
class SourceSignal:
    """A stream-level signal, yielded in order between batches."""

    kind: SignalKind
    """What happened."""
    detail: str = ""
    """Human-readable detail for the log."""


SourceItem = EngineBatch | SourceSignal
"""What an :class:`EventSource` yields."""


class EventSource(Protocol):
    """An engine's event stream: batches in sequence order plus signals; never raises on bad
    input (it counts and skips), runs until :meth:`close`."""

    def items(self) -> AsyncIterator[SourceItem]:
        """Yield batches and signals in order until closed."""
        ...

    async def close(self) -> None:
        """Stop the stream and release its sockets."""
        ...


class PayloadParser(Protocol):
    """Decodes one payload (msgpack bytes); never raises, returns None for an unusable one."""

    stats: ParseStats

    def parse(self, payload: bytes) -> ParsedBatch | None:
        """The batch, or None when the whole payload is unusable (counted in ``stats``)."""
        ...


@dataclass
class ParseStats:
    """Counters of a parser (exported as metrics by the server)."""

    batches: int = 0
    """Payloads decoded (fully or partly)."""
    events: int = 0
    """Events decoded."""
    errors: Counter[str] = field(default_factory=Counter)
    """Skipped payloads/events by reason (``msgpack``, ``batch_shape``, ``unknown_event``...)."""
