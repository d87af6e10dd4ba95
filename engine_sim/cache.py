"""A finite KV cache of blocks: prefix reuse, reference counts, LRU eviction, cache events.

Modelled on vLLM's prefix cache (v1 ``BlockPool``/``KVCacheManager``):

- A prompt's full blocks get chained engine hashes (:class:`EngineHasher`): SHA-256 over the
  parent digest and the block's token ids, rooted at a per-process random seed like vLLM's
  ``NONE_HASH``. Consumers must treat them as opaque ids (ENGINE_EVENTS.md).
- A request holds its blocks while it runs (reference count > 0, never evicted). When it ends
  its blocks become evictable but stay cached; they are evicted least-recently-used first, and a
  sequence's tail blocks before its head (vLLM frees blocks in reverse order).
- Every block slot is one unit of the capacity: cached blocks, blocks held by running requests,
  and the anonymous blocks a request needs for its partial last prompt block and its output.
- Like vLLM, at least one prompt token is always computed, so a fully cached prompt reports
  its last full block as uncached.
- Changes are recorded as events (:class:`BlockStored`, :class:`BlockRemoved`,
  :class:`AllBlocksCleared`) that the engine drains and publishes once per scheduler step.

Pure data structure: no I/O, no clock; the in-process bench can reuse it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A run of consecutive full blocks entered the cache."""

    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks were evicted from the cache."""

    block_hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""


CacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EngineHasher:
    """vLLM-style chained block hashes: ``sha256(parent_digest || tokens_u32le || extra)``.

    ``seed`` < 0 draws a random root per instance (vLLM's ``NONE_HASH`` without
    ``PYTHONHASHSEED``), so hashes differ between engine processes and restarts.
    """

    def __init__(self, seed: int = -1) -> None:
        raw = os.urandom(32) if seed < 0 else seed.to_bytes(16, "big", signed=False)
        self.none_hash = hashlib.sha256(b"engine-sim/none-hash\x00" + raw).digest()

    def hash_blocks(self, token_ids: Sequence[int], block_size: int,
                    extra: bytes = b"") -> list[bytes]:
        """Digests of every full block of ``token_ids`` (``extra`` salts the first block)."""
        n_full = len(token_ids) // block_size
        if n_full == 0:
            return []
        data = np.asarray(token_ids[: n_full * block_size], dtype=np.int64)
        if data.size and (int(data.min()) < 0 or int(data.max()) > 0xFFFFFFFF):
            raise ValueError("token ids must be in 0..4294967295")
        raw = data.astype("<u4").tobytes()
        step = block_size * 4
        out: list[bytes] = []
        parent = self.none_hash
        for i in range(n_full):
            h = hashlib.sha256(parent)
            h.update(raw[i * step:(i + 1) * step])
            if i == 0 and extra:
                h.update(extra)
            parent = h.digest()
            out.append(parent)
        return out


def hash_to_int(digest: bytes) -> int:
    """The uint64 vLLM puts on the wire for a digest: its last 8 bytes, big-endian."""
    return int.from_bytes(digest[-8:], "big")


@dataclass(slots=True)
class _Block:
    parent: bytes | None
    refs: int = 0


@dataclass(slots=True)
class Allocation:
    """Blocks a running request holds; give it back with :meth:`KVCache.release`."""

    block_hashes: list[bytes]
    anon_blocks: int
    cached_tokens: int
    released: bool = field(default=False)


@dataclass(slots=True)
class CacheCounters:
    """Monotonic counters (prompt tokens and blocks) for metrics and the bench."""

    queries_tokens: int = 0
    hits_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0
    cleared: int = 0
    requests: int = 0
    requests_with_hit: int = 0


class KVCache:
    """``capacity_blocks`` block slots shared by cached and in-use blocks; LRU eviction."""

    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        if capacity_blocks < 1 or block_size < 1:
            raise ValueError("capacity_blocks and block_size must be >= 1")
        self.capacity = capacity_blocks
        self.block_size = block_size
        self._blocks: dict[bytes, _Block] = {}
        self._lru: OrderedDict[bytes, None] = OrderedDict()  # refs == 0, oldest first
        self._anon = 0
        self._held = 0  # hashed blocks with refs > 0
        self._events: list[CacheEvent] = []
        self.counters = CacheCounters()

    # ---- state ---------------------------------------------------------------------------
    @property
    def cached_blocks(self) -> int:
        """Hashed blocks present (in use or evictable)."""
        return len(self._blocks)

    @property
    def used_blocks(self) -> int:
        """Blocks held by running requests (vLLM's notion of used: not free, not evictable)."""
        return self._held + self._anon

    @property
    def occupied_blocks(self) -> int:
        """Slots taken by anything (held, anonymous, or cached-but-evictable)."""
        return len(self._blocks) + self._anon

    @property
    def usage(self) -> float:
        """``vllm:kv_cache_usage_perc``: fraction of blocks in use by running requests."""
        return self.used_blocks / self.capacity

    def contains(self, digest: bytes) -> bool:
        """True when the block is cached."""
        return digest in self._blocks

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        """Slots a request needs for its whole sequence (prompt + output)."""
        return -(-(prompt_tokens + max_tokens) // self.block_size)

    def match(self, hashes: Sequence[bytes], prompt_tokens: int) -> int:
        """Blocks of the longest cached prefix a request could reuse (at least 1 token computed)."""
        limit = min(len(hashes), max(prompt_tokens - 1, 0) // self.block_size)
        n = 0
        while n < limit and hashes[n] in self._blocks:
            n += 1
        return n

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, hashes: Sequence[bytes], prompt_tokens: int, max_tokens: int) -> bool:
        """True when :meth:`allocate` would succeed now (possibly after evictions)."""
        return self._plan(hashes, prompt_tokens, max_tokens) is not None

    def _plan(self, hashes: Sequence[bytes], prompt_tokens: int,
              max_tokens: int) -> tuple[int, int] | None:
        total = self.blocks_needed(prompt_tokens, max_tokens)
        if total > self.capacity:
            return None
        matched = self.match(hashes, prompt_tokens)
        present_free = 0  # already-cached blocks of this request now sitting in the LRU
        new_slots = 0
        for digest in hashes:
            blk = self._blocks.get(digest)
            if blk is None:
                new_slots += 1
            elif blk.refs == 0:
                present_free += 1
        anon = total - len(hashes)
        new_slots += anon
        evictable = len(self._lru) - present_free
        free = self.capacity - self.occupied_blocks
        if new_slots > free + evictable:
            return None
        return matched, anon

    def allocate(self, hashes: Sequence[bytes], token_ids: Sequence[int],
                 max_tokens: int) -> Allocation | None:
        """Hold the request's blocks: reuse the cached prefix, evict LRU blocks, store new ones.

        Returns None (and changes nothing) when the blocks do not fit even after evicting every
        evictable block; the caller keeps the request queued.
        """
        prompt_tokens = len(token_ids)
        plan = self._plan(hashes, prompt_tokens, max_tokens)
        if plan is None:
            return None
        matched, anon = plan
        # 1. take references on blocks already present, so eviction cannot pick them
        for digest in hashes:
            blk = self._blocks.get(digest)
            if blk is not None:
                self._ref(digest, blk)
        # 2. make room
        missing = sum(1 for d in hashes if d not in self._blocks)
        self._evict(missing + anon - (self.capacity - self.occupied_blocks))
        # 3. store the missing blocks, one BlockStored per contiguous run
        bs = self.block_size
        run: list[bytes] = []
        run_start = 0
        for i, digest in enumerate(hashes):
            if digest in self._blocks:
                self._flush_run(run, run_start, hashes, token_ids)
                run = []
                continue
            if not run:
                run_start = i
            parent = hashes[i - 1] if i else None
            self._blocks[digest] = _Block(parent=parent, refs=1)
            self._held += 1
            run.append(digest)
        self._flush_run(run, run_start, hashes, token_ids)
        self._anon += anon
        cached_tokens = matched * bs
        c = self.counters
        c.queries_tokens += prompt_tokens
        c.hits_tokens += cached_tokens
        c.requests += 1
        c.requests_with_hit += 1 if cached_tokens else 0
        return Allocation(block_hashes=list(hashes), anon_blocks=anon,
                          cached_tokens=cached_tokens)

    def _flush_run(self, run: list[bytes], start: int, hashes: Sequence[bytes],
                   token_ids: Sequence[int]) -> None:
        if not run:
            return
        bs = self.block_size
        tokens = tuple(int(t) for t in token_ids[start * bs:(start + len(run)) * bs])
        parent = hashes[start - 1] if start else None
        self._events.append(BlockStored(tuple(run), parent, tokens, bs))
        self.counters.stored_blocks += len(run)

    def _ref(self, digest: bytes, blk: _Block) -> None:
        if blk.refs == 0:
            self._lru.pop(digest, None)
            self._held += 1
        blk.refs += 1

    def _evict(self, n: int) -> None:
        removed: list[bytes] = []
        while n > 0 and self._lru:
            digest, _ = self._lru.popitem(last=False)
            del self._blocks[digest]
            removed.append(digest)
            n -= 1
        if removed:
            self._events.append(BlockRemoved(tuple(removed)))
            self.counters.evicted_blocks += len(removed)

    def release(self, alloc: Allocation) -> None:
        """Give back a request's blocks; they stay cached and become evictable (tail first)."""
        if alloc.released:
            return
        alloc.released = True
        self._anon -= alloc.anon_blocks
        for digest in reversed(alloc.block_hashes):
            blk = self._blocks.get(digest)
            if blk is None or blk.refs == 0:
                continue
            blk.refs -= 1
            if blk.refs == 0:
                self._held -= 1
                self._lru[digest] = None

    def reset(self) -> bool:
        """Drop every evictable block (vLLM ``reset_prefix_cache``). False while any is in use.

        Like vLLM, a reset is refused while requests hold blocks.
        """
        if self._held or self._anon:
            return False
        self._blocks.clear()
        self._lru.clear()
        self._events.append(AllBlocksCleared())
        self.counters.cleared += 1
        return True

    def drain_events(self) -> list[CacheEvent]:
        """Events recorded since the last call, in order."""
        out, self._events = self._events, []
        return out
