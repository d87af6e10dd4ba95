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

Pure data structure: no I/O, no clock. The in-process bench (:mod:`engine_sim.fleet`) uses it
with a trace's precomputed block ids, events off.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import KeysView, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

BlockId: TypeAlias = bytes | int
"""A block's id in the cache: an engine digest (bytes) or a precomputed canonical hash (int)."""

Change: TypeAlias = tuple[BlockId | None, bool]
"""One entry of :meth:`KVCache.drain_changes`."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A run of consecutive full blocks entered the cache."""

    block_hashes: tuple[BlockId, ...]
    parent_block_hash: BlockId | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks were evicted from the cache."""

    block_hashes: tuple[BlockId, ...]


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
class Allocation:
    """Blocks a running request holds; give it back with :meth:`KVCache.release`."""

    block_hashes: list[BlockId]
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
    """``capacity_blocks`` block slots shared by cached and in-use blocks; LRU eviction.

    Block ids are opaque and hashable: the engine's SHA-256 digests (``bytes``), or, in the
    in-process bench, a trace's canonical ``int`` hashes given as they are (no token ids, no
    hashing). ``record_events=False`` skips building cache events (the in-process bench has no
    subscriber); ``track_changes=True`` keeps a cheap log of ``(block, stored?)`` changes and
    resets for :meth:`drain_changes` (what a registry learns from heartbeats).
    """

    def __init__(self, capacity_blocks: int, block_size: int, *, record_events: bool = True,
                 track_changes: bool = False) -> None:
        if capacity_blocks < 1 or block_size < 1:
            raise ValueError("capacity_blocks and block_size must be >= 1")
        self.capacity = capacity_blocks
        self.block_size = block_size
        self.record_events = record_events
        self._refs: dict[BlockId, int] = {}  # every cached block -> running requests holding it
        self._lru: OrderedDict[BlockId, None] = OrderedDict()  # refs == 0, oldest first
        self._anon = 0
        self._held = 0  # hashed blocks with refs > 0
        self._events: list[CacheEvent] = []
        self._changes: list[Change] | None = [] if track_changes else None
        self.counters = CacheCounters()

    # ---- state ---------------------------------------------------------------------------
    @property
    def cached_blocks(self) -> int:
        """Hashed blocks present (in use or evictable)."""
        return len(self._refs)

    @property
    def used_blocks(self) -> int:
        """Blocks held by running requests (vLLM's notion of used: not free, not evictable)."""
        return self._held + self._anon

    @property
    def occupied_blocks(self) -> int:
        """Slots taken by anything (held, anonymous, or cached-but-evictable)."""
        return len(self._refs) + self._anon

    @property
    def usage(self) -> float:
        """``vllm:kv_cache_usage_perc``: fraction of blocks in use by running requests."""
        return self.used_blocks / self.capacity

    def contains(self, block: BlockId) -> bool:
        """True when the block is cached."""
        return block in self._refs

    def block_ids(self) -> KeysView[BlockId]:
        """A live view of every cached block id (do not modify the cache while iterating)."""
        return self._refs.keys()

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        """Slots a request needs for its whole sequence (prompt + output)."""
        return -(-(prompt_tokens + max_tokens) // self.block_size)

    def match(self, hashes: Sequence[BlockId], prompt_tokens: int) -> int:
        """Blocks of the longest cached prefix a request could reuse (at least 1 token computed)."""
        limit = min(len(hashes), max(prompt_tokens - 1, 0) // self.block_size)
        refs = self._refs
        n = 0
        while n < limit and hashes[n] in refs:
            n += 1
        return n

    def leading_cached(self, hashes: Sequence[BlockId]) -> int:
        """Leading ``hashes`` cached now, every one counted (what an index of this cache says)."""
        refs = self._refs
        n = 0
        for block in hashes:
            if block not in refs:
                break
            n += 1
        return n

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, hashes: Sequence[BlockId], prompt_tokens: int,
                     max_tokens: int) -> bool:
        """True when :meth:`allocate` would succeed now (possibly after evictions)."""
        return self._plan(hashes, prompt_tokens, max_tokens) is not None

    def _plan(self, hashes: Sequence[BlockId], prompt_tokens: int,
              max_tokens: int) -> tuple[int, int] | None:
        """``(missing blocks, anonymous blocks)`` when the request fits now, else None."""
        total = self.blocks_needed(prompt_tokens, max_tokens)
        if total > self.capacity:
            return None
        refs = self._refs
        present_free = 0  # already-cached blocks of this request now sitting in the LRU
        missing = 0
        for block in hashes:
            r = refs.get(block)
            if r is None:
                missing += 1
            elif r == 0:
                present_free += 1
        anon = total - len(hashes)
        evictable = len(self._lru) - present_free
        free = self.capacity - len(refs) - self._anon
        if missing + anon > free + evictable:
            return None
        return missing, anon

    def allocate(self, hashes: Sequence[BlockId], token_ids: Sequence[int],
                 max_tokens: int) -> Allocation | None:
        """Hold the request's blocks: reuse the cached prefix, evict LRU blocks, store new ones.

        ``hashes`` are the full blocks of ``token_ids``. Returns None (and changes nothing) when
        the blocks do not fit even after evicting every evictable block; the caller keeps the
        request queued.
        """
        return self._allocate(hashes, len(token_ids), max_tokens, token_ids)

    def allocate_ids(self, block_ids: Sequence[BlockId], prompt_tokens: int,
                     max_tokens: int) -> Allocation | None:
        """:meth:`allocate` for a prompt known only by its full blocks' ids and its length.

        The in-process bench's path: no token ids, so stored events (if recorded) carry none.
        """
        if len(block_ids) > prompt_tokens // self.block_size:
            raise ValueError(f"{len(block_ids)} block ids for a {prompt_tokens}-token prompt: "
                             f"only its {prompt_tokens // self.block_size} full blocks have ids")
        return self._allocate(block_ids, prompt_tokens, max_tokens, None)

    def _allocate(self, hashes: Sequence[BlockId], prompt_tokens: int, max_tokens: int,
                  token_ids: Sequence[int] | None) -> Allocation | None:
        plan = self._plan(hashes, prompt_tokens, max_tokens)
        if plan is None:
            return None
        missing, anon = plan
        matched = self.match(hashes, prompt_tokens)
        refs = self._refs
        lru = self._lru
        # 1. take references on blocks already present, so eviction cannot pick them
        for block in hashes:
            r = refs.get(block)
            if r is not None:
                if r == 0:
                    del lru[block]
                    self._held += 1
                refs[block] = r + 1
        # 2. make room
        self._evict(missing + anon - (self.capacity - len(refs) - self._anon))
        # 3. store the missing blocks (events: one BlockStored per contiguous run)
        if missing:
            self._store(hashes, token_ids)
        self._anon += anon
        cached_tokens = matched * self.block_size
        c = self.counters
        c.queries_tokens += prompt_tokens
        c.hits_tokens += cached_tokens
        c.requests += 1
        c.requests_with_hit += 1 if cached_tokens else 0
        return Allocation(block_hashes=list(hashes), anon_blocks=anon,
                          cached_tokens=cached_tokens)

    def _store(self, hashes: Sequence[BlockId], token_ids: Sequence[int] | None) -> None:
        refs = self._refs
        changes = self._changes
        events = self.record_events
        run_start = -1
        stored = 0
        for i, block in enumerate(hashes):
            if block in refs:
                if events and run_start >= 0:
                    self._flush_run(hashes, run_start, i, token_ids)
                run_start = -1
                continue
            if run_start < 0:
                run_start = i
            refs[block] = 1
            stored += 1
            if changes is not None:
                changes.append((block, True))
        if events and run_start >= 0:
            self._flush_run(hashes, run_start, len(hashes), token_ids)
        self._held += stored
        self.counters.stored_blocks += stored

    def _flush_run(self, hashes: Sequence[BlockId], start: int, end: int,
                   token_ids: Sequence[int] | None) -> None:
        bs = self.block_size
        tokens = () if token_ids is None else tuple(token_ids[start * bs:end * bs])
        parent = hashes[start - 1] if start else None
        self._events.append(BlockStored(tuple(hashes[start:end]), parent, tokens, bs))

    def _evict(self, n: int) -> None:
        if n <= 0 or not self._lru:
            return
        removed: list[BlockId] = []
        refs = self._refs
        lru = self._lru
        changes = self._changes
        while n > 0 and lru:
            block, _ = lru.popitem(last=False)
            del refs[block]
            removed.append(block)
            if changes is not None:
                changes.append((block, False))
            n -= 1
        if self.record_events:
            self._events.append(BlockRemoved(tuple(removed)))
        self.counters.evicted_blocks += len(removed)

    def release(self, alloc: Allocation) -> None:
        """Give back a request's blocks; they stay cached and become evictable (tail first)."""
        if alloc.released:
            return
        alloc.released = True
        self._anon -= alloc.anon_blocks
        refs = self._refs
        lru = self._lru
        for block in reversed(alloc.block_hashes):
            r = refs.get(block)
            if not r:
                continue
            refs[block] = r - 1
            if r == 1:
                self._held -= 1
                lru[block] = None

    def reset(self) -> bool:
        """Drop every evictable block (vLLM ``reset_prefix_cache``). False while any is in use.

        Like vLLM, a reset is refused while requests hold blocks.
        """
        if self._held or self._anon:
            return False
        self._refs.clear()
        self._lru.clear()
        if self.record_events:
            self._events.append(AllBlocksCleared())
        if self._changes is not None:
            self._changes.append((None, False))
        self.counters.cleared += 1
        return True

    def drain_events(self) -> list[CacheEvent]:
        """Events recorded since the last call, in order (always empty without record_events)."""
        out, self._events = self._events, []
        return out

    def drain_changes(self) -> list[Change]:
        """``(block, True)`` stored, ``(block, False)`` evicted, ``(None, False)`` = all cleared,
        in order since the last call (needs ``track_changes=True``)."""
        if self._changes is None:
            raise RuntimeError("KVCache(track_changes=True) is needed for drain_changes()")
        out, self._changes = self._changes, []
        return out
