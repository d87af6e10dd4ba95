"""Read the engine's reported cached tokens from a response body as it streams past.

vLLM, SGLang and engine_sim report ``usage.prompt_tokens_details.cached_tokens`` in the JSON
body of a non-streamed response and, when streaming with ``stream_options.include_usage``, in
the last SSE ``data:`` event. The picker sees the body in ext_proc pieces of arbitrary size, so
instead of parsing megabytes of JSON it scans each piece (plus a short tail of the previous one,
so a key split across two pieces is still found) for ``"cached_tokens": N`` and keeps the last
value. A JSON string cannot contain that text unescaped (its quotes would be ``\\"``), so
generated text never matches.
"""

from __future__ import annotations

import re

_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_TAIL = 64


class UsageScanner:
    """Feed response body pieces; ``cached_tokens`` is the last value seen (None = none)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.scanned = 0
        self.cached_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self._tail = b""

    @property
    def exhausted(self) -> bool:
        """True once ``max_bytes`` have been scanned (later pieces are ignored)."""
        return self.scanned >= self.max_bytes

    def feed(self, piece: bytes) -> None:
        """Scan one body piece."""
        if not piece or self.exhausted:
            return
        piece = piece[: self.max_bytes - self.scanned]
        self.scanned += len(piece)
        window = self._tail + piece
        # a match entirely inside the old tail was counted already; re-finding it is harmless
        # because only the last value is kept
        for m in _CACHED.finditer(window):
            if m.end() < len(window) or not piece[-1:].isdigit():
                self.cached_tokens = int(m.group(1))
        for m in _PROMPT.finditer(window):
            if m.end() < len(window) or not piece[-1:].isdigit():
                self.prompt_tokens = int(m.group(1))
        self._tail = window[-_TAIL:]
