"""The tokenizer interface the router uses for prompts given as text.

Token ids are the preferred input; a prompt string is tokenized with the configured tokenizer so
its blocks hash like the engine's. Implementations live one per file: :mod:`.tokenizer_hf`
(HuggingFace ``tokenizers`` from a local ``tokenizer.json``, the real thing) and
:mod:`.tokenizer_simple` (a deterministic word tokenizer for demos; it matches no real model).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """Text -> token ids."""

    name: str
    """Short description for logs and Stats."""
    vocab_size: int
    """Ids are in 0..vocab_size-1."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...


def load_tokenizer(kind: str, path: str = "") -> Tokenizer:
    """``simple`` or ``hf`` (``path`` = a local tokenizer.json). ValueError for anything else."""
    if kind == "simple":
        from router_service.tokenizer_simple import SimpleTokenizer

        return SimpleTokenizer()
    if kind == "hf":
        from router_service.tokenizer_hf import HFTokenizer

        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer {kind!r}; choose simple or hf")
