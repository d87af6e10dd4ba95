"""A finite LRU KV cache of blocks, as an engine with prefix caching keeps one.

Blocks are touched last-to-first when a request uses them, so a prompt's first blocks are the
most recently used and its tail is evicted first (vLLM frees a request's blocks in reverse order
for the same reason): the cache keeps prefixes, not random holes. Optionally it keeps a log of
stores and removals so a *delayed* view (what the registry believed ``delay`` seconds ago, i.e.
heartbeat lag) can be replayed next to the truth.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence


class LruBlockCache:
    """Block hashes in LRU order with a fixed capacity (in blocks)."""

    __slots__ = ("_believed", "_blocks", "_log", "capacity", "delay_s", "evictions")

    def __init__(self, capacity: int, delay_s: float = 0.0) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be >= 1 block")
        self.capacity = capacity
        self.delay_s = delay_s
        self.evictions = 0
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._log: deque[tuple[float, int, bool]] = deque()
        self._believed: set[int] = set()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def match(self, hashes: Sequence[int]) -> int:
        """Number of leading ``hashes`` present (what the engine would reuse now)."""
        blocks = self._blocks
        k = 0
        for h in hashes:
            if h not in blocks:
                break
            k += 1
        return k

    def believed_match(self, hashes: Sequence[int], now: float) -> int:
        """Leading blocks present as of ``now - delay_s`` (the registry's lagging belief)."""
        if self.delay_s <= 0:
            return self.match(hashes)
        log = self._log
        believed = self._believed
        limit = now - self.delay_s
        while log and log[0][0] <= limit:
            _, h, added = log.popleft()
            if added:
                believed.add(h)
            else:
                believed.discard(h)
        k = 0
        for h in hashes:
            if h not in believed:
                break
            k += 1
        return k

    def use(self, hashes: Sequence[int], now: float = 0.0) -> int:
        """Store/touch every block of a request (first block most recent); returns evictions."""
        blocks = self._blocks
        logging = self.delay_s > 0
        evicted = 0
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
                continue
            blocks[h] = None
            if logging:
                self._log.append((now, h, True))
            if len(blocks) > self.capacity:
                old, _ = blocks.popitem(last=False)
                evicted += 1
                if logging:
                    self._log.append((now, old, False))
        self.evictions += evicted
        return evicted
