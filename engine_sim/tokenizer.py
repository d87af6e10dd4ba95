"""A tiny deterministic tokenizer for text prompts (no model files, same ids in every process).

Text splits into pieces of up to 6 word characters (with the leading space, BPE-style), single
punctuation marks and whitespace runs; each piece maps to an id by a fixed-seed hash. About one
token per 4-5 characters of English, and a shared text prefix gives a shared token prefix (up to
the piece that differs). Output text for generated ids comes from a small fixed word list.
"""

from __future__ import annotations

import re

from xxhash import xxh3_64_intdigest

VOCAB_SIZE = 50000
"""Token ids are in ``[FIRST_ID, VOCAB_SIZE)``."""

FIRST_ID = 100
_SEED = 0x656E_6769_6E65_7369  # "enginesi"
_PIECE = re.compile(r" ?\w{1,6}| ?[^\w\s]|\s+")
_WORDS = ("the", "cache", "block", "token", "route", "engine", "prefix", "node", "fleet",
          "model", "serve", "queue", "batch", "reuse", "hit", "load")


class SimpleTokenizer:
    """Deterministic text <-> ids for engine_sim (not a real model's vocabulary)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        span = VOCAB_SIZE - FIRST_ID
        return [FIRST_ID + xxh3_64_intdigest(p.encode("utf-8"), _SEED) % span
                for p in _PIECE.findall(text)]

    def decode(self, token_ids: list[int]) -> str:
        """Readable filler text for generated ids (one word per id)."""
        return "".join(" " + _WORDS[t % len(_WORDS)] for t in token_ids)

    @staticmethod
    def output_ids(request_key: str, n: int) -> list[int]:
        """``n`` deterministic generated ids for a request."""
        base = xxh3_64_intdigest(request_key.encode("utf-8"), _SEED)
        span = VOCAB_SIZE - FIRST_ID
        return [FIRST_ID + (base + 7919 * i) % span for i in range(n)]
