"""Read a few fields of a serialized write message without decoding it.

A 1 M-hash heartbeat costs tens of milliseconds to decode into a protobuf message; the guard
only needs the node id and how many hashes each repeated field carries to refuse it. This
walks the message's top-level fields (proto3 encodes the repeated ``uint64`` hash lists packed:
one length-delimited field whose element count is the number of bytes without the varint
continuation bit, counted with numpy) and gives up (returns None: decode normally) on
anything unusual, such as more than a few dozen top-level fields or unpacked repeated fields.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

THREAD_BYTES = 256 * 1024
"""Messages larger than this are scanned in a worker thread (numpy releases the GIL): counting
a 3 MB hash list takes milliseconds that the event loop serving Lookups should not wait."""
MAX_FIELDS = 64
"""A legitimate write message has about a dozen top-level fields; past this, decode instead."""
COUNT_CHUNK = 64 * 1024
"""Bytes of a packed field compared at once: the comparison's temporary array stays this small
(a 3 MB one is a fresh mapping, page-faulted in on every message, in every worker thread's
arena)."""


@dataclass
class Peek:
    """What the scan found: the node id and the element count of each packed field."""

    node_id: str = ""
    counts: dict[int, int] = field(default_factory=dict)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def peek(raw: bytes, packed_fields: frozenset[int]) -> Peek | None:
    """Node id (field 1) and element counts of ``packed_fields``; None if unsure."""
    out = Peek()
    pos, n = 0, 0
    view = memoryview(raw)
    try:
        while pos < len(raw):
            n += 1
            if n > MAX_FIELDS:
                return None
            key, pos = _varint(raw, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(raw, pos)
                if number in packed_fields:
                    return None  # unpacked repeated field: let the decoder count it
            elif wire == 2:
                length, pos = _varint(raw, pos)
                end = pos + length
                if end > len(raw):
                    return None
                if number == 1:
                    out.node_id = bytes(view[pos:end]).decode("utf-8", "replace")
                elif number in packed_fields:
                    out.counts[number] = out.counts.get(number, 0) + _varint_ends(
                        view[pos:end])
                pos = end
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                return None
    except ValueError:
        return None
    return out if pos == len(raw) else None


def _varint_ends(region: memoryview) -> int:
    """How many varints a packed region holds: its bytes without the continuation bit."""
    data = np.frombuffer(region, dtype=np.uint8)
    return sum(int(np.count_nonzero(data[i:i + COUNT_CHUNK] < 0x80))
               for i in range(0, len(data), COUNT_CHUNK))


def node_id_of(raw: bytes) -> str:
    """Field 1 (``node_id`` of every write request) when it comes first, as encoders put it;
    empty otherwise. Reads only the first field."""
    if len(raw) < 2 or raw[0] != 0x0A:
        return ""
    try:
        length, pos = _varint(raw, 1)
    except ValueError:
        return ""
    if length > 128 or pos + length > len(raw):
        return ""
    return raw[pos:pos + length].decode("utf-8", "replace")


async def peek_async(raw: bytes, packed_fields: frozenset[int]) -> Peek | None:
    """:func:`peek`, in a worker thread for large messages."""
    if len(raw) > THREAD_BYTES:
        return await asyncio.to_thread(peek, raw, packed_fields)
    return peek(raw, packed_fields)
