"""A deterministic built-in tokenizer for demos: words and punctuation -> hashed ids.

It matches no real model's vocabulary; it only makes equal text prefixes give equal token
prefixes (so equal block hashes), which is what routing needs. Real deployments send token ids,
or configure the ``hf`` tokenizer with the engine's own ``tokenizer.json``.
"""

from __future__ import annotations

import re

from xxhash import xxh3_64_intdigest

_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")


class SimpleTokenizer:
    """Each word (with its leading spaces) or punctuation mark -> xxh3 % vocab_size."""

    name = "simple"

    def __init__(self, vocab_size: int = 50_000) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        v = self.vocab_size
        return [xxh3_64_intdigest(p.encode("utf-8")) % v for p in _PIECE.findall(text)]
