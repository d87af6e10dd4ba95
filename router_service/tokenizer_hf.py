"""HuggingFace ``tokenizers`` from a local ``tokenizer.json`` (extra: ``kvroute[tokenizers]``).

The package is imported only when this tokenizer is configured. Nothing is downloaded: give the
path of the engine's own ``tokenizer.json`` so the router's ids equal the engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from a file."""

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError("the hf tokenizer needs --tokenizer-file PATH (a tokenizer.json)")
        if not Path(path).is_file():
            raise ValueError(f"tokenizer file {path!r} does not exist")
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ValueError("the hf tokenizer needs the 'tokenizers' package: "
                             "pip install 'kvroute[tokenizers]'") from exc
        self._tok: Any = _Tok.from_file(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.name = f"hf:{Path(path).name}"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)
