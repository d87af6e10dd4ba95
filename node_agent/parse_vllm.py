"""vLLM KV-event payloads (``vllm/distributed/kv_events.py``) into internal events.

Both encodings of an event are read: the positional array with the tag first (up to ~v0.23) and
the map with a ``"type"`` key (vLLM PR #42892). Hashes may be ints (signed or unsigned 64-bit) or
bytes. Fields appended by newer versions are ignored; trailing fields a version omits because
they hold their default are taken as None.
"""

from __future__ import annotations

from typing import Any

from node_agent.events import Event, ParsedBatch, ParseStats
from node_agent.wire import (
    BadEvent,
    BatchDecoder,
    as_fields,
    cleared_event,
    make_stored,
    opt_str,
    removed_event,
    stored_base,
)

POSITIONAL: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name", "extra_keys", "group_idx",
                    "kv_cache_spec_kind", "kv_cache_spec_sliding_window"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}
"""Field names of each event, in wire order after the tag (newer fields appended at the end)."""


def convert_event(raw: Any) -> Event:
    """One vLLM event (positional or map) as an internal event; raises BadEvent."""
    tag, fields = as_fields(raw, POSITIONAL)
    if tag == "BlockStored":
        return make_stored(stored_base(fields),
                           lora_name=opt_str(fields.get("lora_name"), "lora_name"))
    if tag == "BlockRemoved":
        return removed_event(fields)
    if tag == "AllBlocksCleared":
        return cleared_event(fields)
    raise BadEvent("unknown_event", tag)  # pragma: no cover - as_fields checks the tag


class VllmParser:
    """Parses vLLM payloads; counts what it cannot read in ``stats`` and never raises."""

    def __init__(self) -> None:
        self._decoder = BatchDecoder(convert_event, "vllm")
        self.stats: ParseStats = self._decoder.stats

    def parse(self, payload: bytes) -> ParsedBatch | None:
        """The batch, or None when the payload is unusable."""
        return self._decoder.parse(payload)
