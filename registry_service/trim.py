"""Give freed heap memory back to the OS after large messages and departed nodes (glibc).

Large gRPC messages (a 10 MB heartbeat, refused or not) are received and freed in gRPC's
threads. glibc raises its mmap threshold after the first large free, so later large buffers
come from arenas that keep freed pages: measured, a flood of refused 3 MB heartbeats left the
registry's RSS ~30 MB (and, before the reference cycles fixed in ``guard.py`` and
``kvroute/grpcutil.py``, 200-400 MB) above its level with no Python object alive. So:

- at start, the mmap threshold is pinned at 1 MiB (``mallopt``): every buffer that large is
  its own mapping and goes back to the OS when freed (measured: +0.9 MB after the same flood);
- the registry counts write bytes received and index entries dropped (a node leaving), and
  once that passes a threshold, or traffic stops with some pending, it calls
  ``malloc_trim(0)`` in a worker thread (ctypes releases the GIL), at most once a second.

A no-op where libc lacks ``mallopt``/``malloc_trim`` (macOS, musl).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)
CHECK_INTERVAL_S = 1.0
MMAP_THRESHOLD_BYTES = 1 << 20
M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number of the mmap threshold."""
IDLE_TRIM_BYTES = 1 << 20
"""Below the threshold, still trim once traffic stops if at least this much was freed."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _load_trim() -> Callable[[int], int] | None:
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Allocations of ``nbytes`` or more get their own mapping (freed to the OS at once)."""
    fn = getattr(_libc(), "mallopt", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return bool(fn(M_MMAP_THRESHOLD, nbytes))


class MemoryTrimmer:
    """Counts bytes freed by large work; trims the heap once ``threshold`` is passed."""

    def __init__(self, threshold_bytes: int) -> None:
        self.threshold = threshold_bytes
        self.pending = 0
        self.trims = 0
        self._trim = _load_trim() if threshold_bytes > 0 else None
        if self._trim is not None:
            pin_mmap_threshold()
        self._task: asyncio.Task[None] | None = None

    def note(self, nbytes: int) -> None:
        """Record ``nbytes`` of memory that became garbage (a message, dropped entries)."""
        self.pending += nbytes

    def start(self) -> None:
        """Run the background check (needs a running loop)."""
        if self._trim is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-malloc-trim")

    async def close(self) -> None:
        """Stop the background check."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        trim = self._trim
        assert trim is not None
        seen = 0
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            quiet = self.pending == seen  # nothing new since the last check: traffic stopped
            seen = self.pending
            if self.pending < self.threshold and not (quiet and self.pending >= IDLE_TRIM_BYTES):
                continue
            self.pending = seen = 0
            await asyncio.to_thread(trim, 0)
            self.trims += 1
            log.debug("malloc_trim done (%d so far)", self.trims)
