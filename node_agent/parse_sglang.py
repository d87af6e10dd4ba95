"""SGLang KV-event payloads (``python/sglang/srt/disaggregation/kv_events.py``).

Same framing and event names as vLLM, with these differences: the batch's third field is
``attn_dp_rank``; ``block_size`` is the page size and a ``BlockStored`` may end with a partial
page (kept as given here: the block map never indexes a partial block as full); hashes are
signed int64 (or Python ``hash()`` on older versions); the per-request salt travels as
``cache_salt`` (map key) or inside a ``metadata`` struct appended after ``medium``. SGLang
0.5.23 sends map-encoded events (``"type"``) with defaulted ``medium``, ``cache_salt``,
``session_id`` and ``lora_name`` (the public adapter name): ``lora_name`` and ``cache_salt``
become the run's salt, as the router derives it from ``RouteRequest``. With EAGLE "bigram"
radix keys ``token_ids`` holds ``[t_j, t_j+1]`` pairs (read as the prompt's tokens).
Media: ``GPU``, ``CPU_PINNED``, ``DISK``, ``EXTERNAL``.
"""

from __future__ import annotations

from typing import Any

from node_agent.events import Event, ParsedBatch, ParseStats
from node_agent.wire import (
    U64_MASK,
    BadEvent,
    BatchDecoder,
    as_fields,
    cleared_event,
    make_stored,
    opt_str,
    removed_event,
    stored_base,
)

EMPTY_TUPLE_HASH = hash(())
"""What SGLang before the map encoding (0.4.x RadixCache) sends as ``parent_block_hash`` for a
node directly under the radix root: ``hash(tuple(root.key))`` of the empty root key. Python's
tuple hash of ``()`` does not depend on PYTHONHASHSEED. Read as "no parent"."""

POSITIONAL: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "metadata"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}
"""Field names of each event, in wire order after the tag."""


def _cache_salt(fields: dict[str, Any]) -> str | None:
    salt = fields.get("cache_salt")
    if salt is not None:
        return opt_str(salt, "cache_salt")
    meta = fields.get("metadata")
    if meta is None:
        return None
    if isinstance(meta, dict):
        return opt_str(meta.get("cache_salt"), "metadata.cache_salt")
    if isinstance(meta, (list, tuple)):
        return opt_str(meta[0], "metadata.cache_salt") if meta else None
    if isinstance(meta, str):
        return meta
    raise BadEvent("field_type", f"metadata is {type(meta).__name__}")


def convert_event(raw: Any) -> Event:
    """One SGLang event (positional or map) as an internal event; raises BadEvent."""
    tag, fields = as_fields(raw, POSITIONAL)
    if tag == "BlockStored":
        base = stored_base(fields)
        if base["parent_engine_hash"] == EMPTY_TUPLE_HASH & U64_MASK:
            base["parent_engine_hash"] = None
        return make_stored(base, cache_salt=_cache_salt(dict(fields)),
                           lora_name=opt_str(fields.get("lora_name"), "lora_name"))
    if tag == "BlockRemoved":
        return removed_event(fields)
    if tag == "AllBlocksCleared":
        return cleared_event(fields)
    raise BadEvent("unknown_event", tag)  # pragma: no cover - as_fields checks the tag


class SglangParser:
    """Parses SGLang payloads; counts what it cannot read in ``stats`` and never raises."""

    def __init__(self) -> None:
        self._decoder = BatchDecoder(convert_event, "sglang")
        self.stats: ParseStats = self._decoder.stats

    def parse(self, payload: bytes) -> ParsedBatch | None:
        """The batch, or None when the payload is unusable."""
        return self._decoder.parse(payload)
