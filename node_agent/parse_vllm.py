"""vLLM KV-event payloads (``vllm/distributed/kv_events.py``) into internal events.

Both encodings of an event are read: the positional array with the tag first (up to ~v0.23) and
the map with a ``"type"`` key (vLLM PR #42892). Hashes may be ints (signed or unsigned 64-bit) or
bytes. Fields appended by newer versions are ignored; trailing fields a version omits because
they hold their default are taken as None.

``extra_keys`` (one entry per block, untagged, as ``to_event_extra_keys`` publishes them) hold,
in order: the LoRA name (every block of an adapter request), ``[mm_identifier, offset]`` pairs,
the request's ``cache_salt`` (first block of the prompt only) and prompt-embedding digests.
The LoRA name and the salt become the run's salt (``kvroute.blocks.request_salt``), exactly as
the router derives it from ``RouteRequest.lora_name`` / ``cache_salt``; whatever is left cannot
be reproduced from a request and makes the block unmatchable (the block map counts it).
"""

from __future__ import annotations

from collections.abc import Sequence
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
                    "kv_cache_spec_kind", "kv_cache_spec_sliding_window", "locality",
                    "ownership", "session_id", "lookahead_token_ids"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}
"""Field names of each event, in wire order after the tag (newer fields appended at the end)."""


def convert_event(raw: Any) -> Event:
    """One vLLM event (positional or map) as an internal event; raises BadEvent."""
    tag, fields = as_fields(raw, POSITIONAL)
    if tag == "BlockStored":
        base = stored_base(fields)
        lora_name = opt_str(fields.get("lora_name"), "lora_name")
        salt, rest = split_extra_keys(base.pop("extra_keys"), lora_name,
                                      base["parent_engine_hash"] is None)
        return make_stored(base, lora_name=lora_name, cache_salt=salt, extra_keys=rest)
    if tag == "BlockRemoved":
        return removed_event(fields)
    if tag == "AllBlocksCleared":
        return cleared_event(fields)
    raise BadEvent("unknown_event", tag)  # pragma: no cover - as_fields checks the tag


def split_extra_keys(extra: Sequence[object] | None, lora_name: str | None, starts_prompt: bool,
                     ) -> tuple[str | None, tuple[object, ...] | None]:
    """(cache salt, per-block keys left over) of a run's ``extra_keys``.

    Per block: one entry equal to the LoRA name is the adapter (every block carries it); in
    the prompt's first block (the run starts the prompt) a remaining string is the
    ``cache_salt``. Anything else (multimodal ``(id, offset)`` pairs, embedding digests, a
    string elsewhere) stays as the block's unreproducible keys.
    """
    if extra is None:
        return None, None
    salt: str | None = None
    rest: list[object] = []
    for i, keys in enumerate(extra):
        if keys is None:
            rest.append(None)
            continue
        left = list(keys) if isinstance(keys, tuple) else [keys]
        if lora_name and lora_name in left:
            left.remove(lora_name)
        if i == 0 and starts_prompt:
            strs = [k for k in left if isinstance(k, str)]
            if strs:
                salt = strs[-1]
                left.remove(salt)
        rest.append(tuple(left) if left else None)
    return salt, (tuple(rest) if any(r is not None for r in rest) else None)


class VllmParser:
    """Parses vLLM payloads; counts what it cannot read in ``stats`` and never raises."""

    def __init__(self) -> None:
        self._decoder = BatchDecoder(convert_event, "vllm")
        self.stats: ParseStats = self._decoder.stats

    def parse(self, payload: bytes) -> ParsedBatch | None:
        """The batch, or None when the payload is unusable."""
        return self._decoder.parse(payload)
