"""Defensive msgpack decoding shared by the vLLM and SGLang parsers.

A payload is a batch ``[ts, events, dp_rank]`` (or ``[ts, events]`` before vLLM v0.9.1; a map
``{"ts", "events", ...}`` is accepted too). An event is either a positional array with the tag
first or a map with a ``"type"`` key. Field names come from the format's positional table; later
positions and unknown keys are ignored. Nothing here raises: bad payloads and bad events are
counted by reason in :class:`~node_agent.events.ParseStats` and logged (rate-limited).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from node_agent.events import (
    DEVICE_MEDIUM,
    Cleared,
    Event,
    ParsedBatch,
    ParseStats,
    Removed,
    Stored,
)

log = logging.getLogger(__name__)

U64_MASK = (1 << 64) - 1
MAX_TOKEN_ID = (1 << 32) - 1
MAX_BLOCK_SIZE = 1 << 20


class BadEvent(Exception):
    """An event (or batch) that cannot be used; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def engine_hash(value: Any) -> int:
    """An engine block hash as unsigned 64 bits: ints (signed or unsigned) are taken modulo
    2**64; bytes are read as the last 8 bytes big-endian (vLLM with int hashes disabled)."""
    if type(value) is int:
        return value & U64_MASK
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if not raw:
            raise BadEvent("hash_type", "empty bytes hash")
        return int.from_bytes(raw[-8:], "big")
    raise BadEvent("hash_type", f"hash of type {type(value).__name__}")


def hash_list(value: Any) -> tuple[int, ...]:
    """A list of engine hashes."""
    if not isinstance(value, (list, tuple)):
        raise BadEvent("field_type", f"block_hashes is {type(value).__name__}")
    return tuple(engine_hash(v) for v in value)


def token_list(value: Any) -> tuple[int, ...]:
    """Token ids: ints in 0..2**32-1. SGLang EAGLE "bigram" pages carry ``[t_j, t_j+1]`` pairs
    (each position keyed with its successor); the prompt's tokens are the pairs' first
    elements, and consecutive pairs must chain (``pair[j][1] == pair[j+1][0]``)."""
    if not isinstance(value, (list, tuple)):
        raise BadEvent("field_type", f"token_ids is {type(value).__name__}")
    if not value:
        return ()
    if isinstance(value[0], (list, tuple)):
        value = bigram_tokens(value)
    if set(map(type, value)) != {int}:
        raise BadEvent("field_type", "token_ids holds non-integers")
    if min(value) < 0 or max(value) > MAX_TOKEN_ID:
        raise BadEvent("field_type", "token id out of range 0..2**32-1")
    return tuple(value)


def bigram_tokens(pairs: Sequence[Any]) -> list[int]:
    """The tokens of an EAGLE bigram page (first element of each ``[a, b]`` pair)."""
    out: list[int] = []
    prev_next: Any = None
    for p in pairs:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise BadEvent("field_type", "token_ids mixes pairs and other values")
        if prev_next is not None and p[0] != prev_next:
            raise BadEvent("field_type", "bigram token pairs do not chain")
        out.append(p[0])
        prev_next = p[1]
    return out


def opt_int(value: Any, name: str) -> int | None:
    """An optional int (not bool)."""
    if value is None or type(value) is int:
        return value
    raise BadEvent("field_type", f"{name} is {type(value).__name__}")


def opt_str(value: Any, name: str) -> str | None:
    """An optional str."""
    if value is None or isinstance(value, str):
        return value
    raise BadEvent("field_type", f"{name} is {type(value).__name__}")


def medium_of(value: Any) -> str:
    """Medium name, upper-cased; None (older engines) means the device cache."""
    med = opt_str(value, "medium")
    return DEVICE_MEDIUM if med is None else med.upper()


def as_fields(raw: Any, positional: Mapping[str, Sequence[str]]) -> tuple[str, dict[str, Any]]:
    """(tag, fields by name) of a positional or map-encoded event."""
    if isinstance(raw, (list, tuple)):
        if not raw or not isinstance(raw[0], str):
            raise BadEvent("event_shape", "positional event without a string tag")
        tag = raw[0]
        names = positional.get(tag)
        if names is None:
            raise BadEvent("unknown_event", tag[:64])
        return tag, dict(zip(names, raw[1:], strict=False))
    if isinstance(raw, dict):
        dtag = raw.get("type")
        if not isinstance(dtag, str):
            raise BadEvent("event_shape", "map event without a string 'type'")
        if dtag not in positional:
            raise BadEvent("unknown_event", dtag[:64])
        return dtag, raw
    raise BadEvent("event_shape", f"event is {type(raw).__name__}")


def require(fields: Mapping[str, Any], name: str) -> Any:
    """A field that must be present."""
    if name not in fields:
        raise BadEvent("missing_field", name)
    return fields[name]


def stored_base(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The BlockStored fields every engine shares, validated."""
    block_size = require(fields, "block_size")
    if type(block_size) is not int or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise BadEvent("field_type", f"block_size {block_size!r}")
    parent = fields.get("parent_block_hash")
    extra = fields.get("extra_keys")
    if extra is not None and not isinstance(extra, (list, tuple)):
        raise BadEvent("field_type", "extra_keys is not a list")
    look = fields.get("lookahead_token_ids")
    lookahead = 0
    if isinstance(look, (list, tuple)) and look and isinstance(look[0], (list, tuple)):
        lookahead = len(look[0])
    return {
        "lookahead_tokens": lookahead,
        "engine_hashes": hash_list(require(fields, "block_hashes")),
        "parent_engine_hash": None if parent is None else engine_hash(parent),
        "token_ids": token_list(require(fields, "token_ids")),
        "block_size": block_size,
        "medium": medium_of(fields.get("medium")),
        "lora_id": opt_int(fields.get("lora_id"), "lora_id"),
        "group_idx": opt_int(fields.get("group_idx"), "group_idx"),
        "extra_keys": None if extra is None else tuple(freeze(x) for x in extra),
    }


def freeze(value: Any) -> object:
    """Lists as tuples, maps as sorted item tuples (hashable, comparable)."""
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    return value


def removed_event(fields: Mapping[str, Any]) -> Removed:
    """A BlockRemoved event."""
    return Removed(engine_hashes=hash_list(require(fields, "block_hashes")),
                   medium=medium_of(fields.get("medium")),
                   group_idx=opt_int(fields.get("group_idx"), "group_idx"))


def cleared_event(_fields: Mapping[str, Any]) -> Cleared:
    """An AllBlocksCleared event."""
    return Cleared()


class RateLimitedLog:
    """Logs the 1st..5th, then every power-of-two-th occurrence of each reason."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def __call__(self, stats: ParseStats, reason: str, detail: str) -> None:
        n = stats.errors[reason]
        if n <= 5 or (n & (n - 1)) == 0:
            self._log.warning("skipped %s (%s, seen %d times): %s", "engine event data", reason,
                              n, detail[:200])


class BatchDecoder:
    """Decodes payloads into :class:`ParsedBatch` with a per-format event converter."""

    def __init__(self, convert: Callable[[Any], Event], name: str) -> None:
        self._decoder = msgspec.msgpack.Decoder()
        self._convert = convert
        self.stats = ParseStats()
        self._warn = RateLimitedLog(logging.getLogger(f"node_agent.parse_{name}"))

    def _count(self, reason: str, detail: str) -> None:
        self.stats.errors[reason] += 1
        self._warn(self.stats, reason, detail)

    def parse(self, payload: bytes) -> ParsedBatch | None:
        """The batch, or None (counted) when the payload is unusable. Never raises."""
        try:
            obj = self._decoder.decode(payload)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            self._count("msgpack", str(exc))
            return None
        except Exception as exc:  # a decoder bug must never stop the agent
            self._count("msgpack", repr(exc))
            return None
        try:
            ts, raw_events, dp_rank = _batch_parts(obj)
        except BadEvent as exc:
            self._count(exc.reason, str(exc))
            return None
        events: list[Event] = []
        for raw in raw_events:
            try:
                events.append(self._convert(raw))
            except BadEvent as exc:
                self._count(exc.reason, str(exc))
            except Exception as exc:  # defensive: never raise out of the parser
                self._count("internal", repr(exc))
        self.stats.batches += 1
        self.stats.events += len(events)
        return ParsedBatch(ts=ts, events=tuple(events), dp_rank=dp_rank)


def _batch_parts(obj: Any) -> tuple[float, list[Any], int | None]:
    ts: Any
    events: Any
    dp: Any
    if isinstance(obj, dict):
        ts, events = obj.get("ts"), obj.get("events")
        dp = obj.get("data_parallel_rank", obj.get("attn_dp_rank"))
    elif isinstance(obj, list) and len(obj) >= 2:
        ts, events = obj[0], obj[1]
        dp = obj[2] if len(obj) >= 3 else None
    else:
        raise BadEvent("batch_shape", f"batch is {type(obj).__name__}")
    if type(ts) not in (int, float):
        raise BadEvent("batch_shape", f"ts is {type(ts).__name__}")
    if not isinstance(events, list):
        raise BadEvent("batch_shape", f"events is {type(events).__name__}")
    if dp is not None and type(dp) is not int:
        dp = None  # informational only; never worth dropping a batch for
    return float(ts), events, dp


def make_stored(base: dict[str, Any], **extra: Any) -> Stored:
    """A Stored event from validated base fields plus format-specific ones."""
    return Stored(**base, **extra)
