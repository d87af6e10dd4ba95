"""Hand-written KV-event payloads, one per wire shape, all carrying the same events.

These are written by hand from the wire-format notes (ENGINE_EVENTS.md) so that one test can
check every shape decodes to the same internal events. They are NOT the evidence for any wire
format: the payloads recorded from the engines' own code in ``tests/golden/engine_events``
(``scripts/record_engine_payloads.py``) are. :data:`EVIDENCE` names the recording behind each
shape; the shapes without one are synthetic (fields no engine sends yet, for forward
compatibility) or unverified (``sglang_positional_metadata_salt``: no SGLang version found
sending it; parsed, not claimed as supported). Regenerate with
``python tests/unit/payloads/make_payloads.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).parent

TS = 1_764_000_000.25
H1 = 0x1234_5678_9ABC_DEF0
H2 = (1 << 64) - 5  # >= 2**63: msgpack uint64
PARENT = 0x0BAD_CAFE_F00D_0001
TOKENS = list(range(100, 132))  # two 16-token blocks
TOKENS2 = list(range(200, 216))


def _signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


def _digest(h: int) -> bytes:
    """A 32-byte sha256-style digest whose last 8 bytes big-endian are ``h``."""
    return bytes(range(24)) + h.to_bytes(8, "big")


# vLLM <= v0.9.0: 2-element batch, no medium (omitted), int hashes.
VLLM_V090_POSITIONAL_2ELEM: Any = [TS, [
    ["BlockStored", [H1, H2], None, TOKENS, 16, None],
    ["BlockStored", [H1 ^ 1], H2, TOKENS2, 16, None],
    ["BlockRemoved", [H1]],
    ["AllBlocksCleared"],
]]

# vLLM v0.10.2 .. ~v0.23: positional events, medium, 3-element batch with dp rank.
VLLM_POSITIONAL_3ELEM: Any = [TS, [
    ["BlockStored", [H1, H2], None, TOKENS, 16, None, "GPU"],
    ["BlockStored", [H1 ^ 1], H2, TOKENS2, 16, None, "GPU"],
    ["BlockRemoved", [H1], "GPU"],
    ["AllBlocksCleared"],
], 0]

# VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: raw 32-byte digests.
VLLM_BYTES_HASHES: Any = [TS, [
    ["BlockStored", [_digest(H1), _digest(H2)], None, TOKENS, 16, None, "GPU"],
    ["BlockStored", [_digest(H1 ^ 1)], _digest(H2), TOKENS2, 16, None, "GPU"],
    ["BlockRemoved", [_digest(H1)], "GPU"],
    ["AllBlocksCleared"],
], None]

# Newer positional builds: lora_name, extra_keys, group_idx, kv_cache_spec_* and fields
# nobody knows yet appended at the end.
VLLM_POSITIONAL_NEWER_FIELDS: Any = [TS, [
    ["BlockStored", [H1, H2], None, TOKENS, 16, None, "GPU", None, None, 0, "full_attention",
     None, "local", "owned", "sess-1", 0, {"future": True}],
    ["BlockStored", [H1 ^ 1], H2, TOKENS2, 16, None, "GPU", None, None, 0],
    ["BlockRemoved", [H1], "GPU", 0, "local", "owned"],
    ["AllBlocksCleared"],
], 1, "unknown-trailing-batch-field"]

# vLLM PR #42892 (v0.26+): events as maps with "type"; defaults may be omitted.
VLLM_MAP: Any = [TS, [
    {"type": "BlockStored", "block_hashes": [H1, H2], "parent_block_hash": None,
     "token_ids": TOKENS, "block_size": 16, "lora_id": None, "medium": "GPU",
     "lora_name": None},
    {"type": "BlockStored", "block_hashes": [H1 ^ 1], "parent_block_hash": H2,
     "token_ids": TOKENS2, "block_size": 16, "lora_id": None, "medium": "GPU"},
    {"type": "BlockRemoved", "block_hashes": [H1], "medium": "GPU"},
    {"type": "AllBlocksCleared"},
], 0]

# Map events with keys from newest builds (locality, ownership, session_id, skipped_*).
VLLM_MAP_NEWER_KEYS: Any = [TS, [
    {"type": "BlockStored", "block_hashes": [H1, H2], "parent_block_hash": None,
     "token_ids": TOKENS, "block_size": 16, "lora_id": None, "medium": "GPU",
     "lora_name": None, "extra_keys": None, "group_idx": 0,
     "kv_cache_spec_kind": "full_attention", "kv_cache_spec_sliding_window": None,
     "locality": "local", "ownership": "owned", "session_id": "s", "skipped_tokens": 0},
    {"type": "BlockStored", "block_hashes": [H1 ^ 1], "parent_block_hash": H2,
     "token_ids": TOKENS2, "block_size": 16, "lora_id": None, "medium": "GPU",
     "group_idx": 0, "new_thing": [1, 2]},
    {"type": "BlockRemoved", "block_hashes": [H1], "medium": "GPU", "group_idx": 0,
     "locality": "local"},
    {"type": "AllBlocksCleared", "reason": "reset"},
], 0]

# SGLang: signed int64 hashes, attn_dp_rank third, positional (older) ...
SGLANG_POSITIONAL: Any = [TS, [
    ["BlockStored", [_signed(H1), _signed(H2)], None, TOKENS, 16, None, "GPU"],
    ["BlockStored", [_signed(H1 ^ 1)], _signed(H2), TOKENS2, 16, None, "GPU"],
    ["BlockRemoved", [_signed(H1)], "GPU"],
    ["AllBlocksCleared"],
], 0]

# ... and map-encoded (SGLang PR #37482).
SGLANG_MAP: Any = [TS, [
    {"type": "BlockStored", "block_hashes": [_signed(H1), _signed(H2)],
     "parent_block_hash": None, "token_ids": TOKENS, "block_size": 16, "lora_id": None,
     "medium": "GPU"},
    {"type": "BlockStored", "block_hashes": [_signed(H1 ^ 1)], "parent_block_hash": _signed(H2),
     "token_ids": TOKENS2, "block_size": 16, "lora_id": None, "medium": "GPU"},
    {"type": "BlockRemoved", "block_hashes": [_signed(H1)], "medium": "GPU"},
    {"type": "AllBlocksCleared"},
], 0]

# SGLang with a cache salt: as a map key, and as the positional metadata struct.
SGLANG_MAP_CACHE_SALT: Any = [TS, [
    {"type": "BlockStored", "block_hashes": [_signed(H1)], "parent_block_hash": None,
     "token_ids": TOKENS[:16], "block_size": 16, "lora_id": None, "medium": "GPU",
     "cache_salt": "tenant-a"},
], 0]
SGLANG_POSITIONAL_METADATA_SALT: Any = [TS, [
    ["BlockStored", [_signed(H1)], None, TOKENS[:16], 16, None, "GPU", ["tenant-a"]],
], 0]

# SGLang page per event, the last page partial (5 of 16 tokens).
SGLANG_PARTIAL_PAGE: Any = [TS, [
    ["BlockStored", [_signed(H1)], None, TOKENS[:16], 16, None, "GPU"],
    ["BlockStored", [_signed(H2)], _signed(H1), TOKENS[16:21], 16, None, "GPU"],
], 0]

EVIDENCE: dict[str, str | None] = {
    "vllm_v090_positional_2elem": "vllm-0.9.0/plain",
    "vllm_positional_3elem": "vllm-0.23.0/plain",
    "vllm_bytes_hashes": "vllm-0.33.0/bytes_hashes",
    "vllm_positional_newer_fields": None,  # synthetic: fields appended after 0.23's
    "vllm_map": "vllm-0.33.0/plain",
    "vllm_map_newer_keys": None,  # synthetic: map keys no version sends yet
    "sglang_positional": "sglang-0.4.10.post2/plain",
    "sglang_map": "sglang-0.5.23/plain",
    "sglang_map_cache_salt": "sglang-0.5.23/cache_salt",
    "sglang_positional_metadata_salt": None,  # unverified
    "sglang_partial_page": "sglang-0.5.23/partial_page",
}
"""The recording from an engine's own code that backs each hand-written shape (None: none)."""

PAYLOADS: dict[str, Any] = {
    "vllm_v090_positional_2elem": VLLM_V090_POSITIONAL_2ELEM,
    "vllm_positional_3elem": VLLM_POSITIONAL_3ELEM,
    "vllm_bytes_hashes": VLLM_BYTES_HASHES,
    "vllm_positional_newer_fields": VLLM_POSITIONAL_NEWER_FIELDS,
    "vllm_map": VLLM_MAP,
    "vllm_map_newer_keys": VLLM_MAP_NEWER_KEYS,
    "sglang_positional": SGLANG_POSITIONAL,
    "sglang_map": SGLANG_MAP,
    "sglang_map_cache_salt": SGLANG_MAP_CACHE_SALT,
    "sglang_positional_metadata_salt": SGLANG_POSITIONAL_METADATA_SALT,
    "sglang_partial_page": SGLANG_PARTIAL_PAGE,
}


def encode(obj: Any) -> bytes:
    """msgpack bytes as msgspec writes them."""
    return msgspec.msgpack.encode(obj)


if __name__ == "__main__":
    for name, obj in PAYLOADS.items():
        (HERE / f"{name}.msgpack").write_bytes(encode(obj))
        print(name)
