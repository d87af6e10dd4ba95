"""engine_sim KV cache: prefix reuse, LRU eviction order, reference counts, events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_sim.cache import (
    AllBlocksCleared,
    Allocation,
    BlockId,
    BlockRemoved,
    BlockStored,
    EngineHasher,
    KVCache,
    hash_to_int,
)

BS = 4


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_hashes_are_chained_seeded_and_opaque() -> None:
    a, b = EngineHasher(7), EngineHasher(7)
    assert a.hash_blocks(toks(0, 9), BS) == b.hash_blocks(toks(0, 9), BS)
    assert len(a.hash_blocks(toks(0, 9), BS)) == 2  # only full blocks
    # the hash of block 1 depends on block 0 (chained)
    x = a.hash_blocks([9, 9, 9, 9, 1, 2, 3, 4], BS)
    y = a.hash_blocks([8, 9, 9, 9, 1, 2, 3, 4], BS)
    assert x[1] != y[1]
    # random seed per process, like vLLM's NONE_HASH: two engines disagree
    assert EngineHasher().hash_blocks(toks(0, 4), BS) != EngineHasher().hash_blocks(toks(0, 4), BS)
    digest = a.hash_blocks(toks(0, 4), BS)[0]
    assert len(digest) == 32 and 0 <= hash_to_int(digest) < 2**64


def test_prefix_reuse_and_stored_events() -> None:
    h, c = EngineHasher(1), KVCache(64, BS)
    p1 = toks(0, 12)
    a1 = c.allocate(h.hash_blocks(p1, BS), p1, 1)
    assert a1 is not None and a1.cached_tokens == 0
    [ev] = c.drain_events()
    assert isinstance(ev, BlockStored)
    assert ev.parent_block_hash is None and ev.token_ids == tuple(p1) and len(ev.block_hashes) == 3
    c.release(a1)
    # shares the first two blocks, then diverges
    p2 = [*toks(0, 8), 99, 98, 97, 96, 95]
    hs2 = h.hash_blocks(p2, BS)
    a2 = c.allocate(hs2, p2, 1)
    assert a2 is not None and a2.cached_tokens == 8
    [ev2] = c.drain_events()
    assert isinstance(ev2, BlockStored)
    assert ev2.parent_block_hash == hs2[1] and ev2.block_hashes == (hs2[2],)
    assert ev2.token_ids == (99, 98, 97, 96)
    assert c.counters.queries_tokens == 25 and c.counters.hits_tokens == 8


def test_fully_cached_prompt_still_computes_its_last_block() -> None:
    h, c = EngineHasher(1), KVCache(64, BS)
    p = toks(0, 8)
    c.release(c.allocate(h.hash_blocks(p, BS), p, 1))  # type: ignore[arg-type]
    again = c.allocate(h.hash_blocks(p, BS), p, 1)
    assert again is not None and again.cached_tokens == 4  # vLLM: at least one token computed


def test_lru_evicts_least_recent_and_tail_first() -> None:
    h, c = EngineHasher(1), KVCache(6, BS)
    pa, pb = toks(0, 8), toks(100, 8)
    ha, hb = h.hash_blocks(pa, BS), h.hash_blocks(pb, BS)
    c.release(c.allocate(ha, pa, 1))  # type: ignore[arg-type]  # 2 blocks + 1 anon
    c.release(c.allocate(hb, pb, 1))  # type: ignore[arg-type]
    c.drain_events()
    assert c.cached_blocks == 4 and c.used_blocks == 0
    # touch A so B becomes least recently used
    c.release(c.allocate(ha, pa, 1))  # type: ignore[arg-type]
    c.drain_events()
    pc = toks(200, 8)
    hc = h.hash_blocks(pc, BS)
    ac = c.allocate(hc, pc, 1)  # needs 3 slots; 2 free -> evict 1: B's tail block
    assert ac is not None
    evs = c.drain_events()
    assert evs[0] == BlockRemoved((hb[1],))
    assert c.contains(hb[0]) and not c.contains(hb[1]) and c.contains(ha[1])
    assert c.counters.evicted_blocks == 1


def test_blocks_in_use_are_never_evicted() -> None:
    h, c = EngineHasher(1), KVCache(4, BS)
    pa = toks(0, 12)
    aa = c.allocate(h.hash_blocks(pa, BS), pa, 1)  # 3 hashed + 1 anon = all 4 slots
    assert aa is not None and c.used_blocks == 4 and c.usage == 1.0
    pb = toks(50, 4)
    assert not c.can_allocate(h.hash_blocks(pb, BS), len(pb), 1)
    assert c.allocate(h.hash_blocks(pb, BS), pb, 1) is None
    assert c.drain_events() == [BlockStored(tuple(h.hash_blocks(pa, BS)), None, tuple(pa), BS)]
    c.release(aa)
    c.release(aa)  # double release is harmless
    assert c.used_blocks == 0 and c.cached_blocks == 3
    assert c.allocate(h.hash_blocks(pb, BS), pb, 1) is not None


def test_shared_blocks_are_reference_counted() -> None:
    h, c = EngineHasher(1), KVCache(16, BS)
    p = toks(0, 9)
    hs = h.hash_blocks(p, BS)
    a1, a2 = c.allocate(hs, p, 1), c.allocate(hs, p, 1)
    assert a1 is not None and a2 is not None and a2.cached_tokens == 8
    c.release(a1)
    assert c.used_blocks == 2 + 1  # a2 still holds both hashed blocks and its anon block
    c.release(a2)
    assert c.used_blocks == 0 and c.cached_blocks == 2


def test_reset_refused_while_in_use_then_clears() -> None:
    h, c = EngineHasher(1), KVCache(16, BS)
    p = toks(0, 8)
    a = c.allocate(h.hash_blocks(p, BS), p, 1)
    assert a is not None and not c.reset()
    c.release(a)
    c.drain_events()
    assert c.reset() and c.cached_blocks == 0
    assert c.drain_events() == [AllBlocksCleared()]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "alloc", "alloc", "release", "reset"]),
                          st.integers(0, 3), st.integers(1, 30), st.integers(1, 6)),
                max_size=60))
def test_event_stream_always_mirrors_the_cache(ops: list[tuple[str, int, int, int]]) -> None:
    """Replaying the events gives exactly the cached blocks; capacity and refcounts hold."""
    h, c = EngineHasher(2), KVCache(12, BS, track_changes=True)
    families = [toks(1000 * f, 40) for f in range(4)]
    live: list[Allocation] = []
    mirror: set[BlockId] = set()
    changes: set[BlockId | None] = set()  # the cheap change log must agree too
    for op, fam, length, max_tokens in ops:
        if op == "alloc":
            p = families[fam][:length]
            a = c.allocate(h.hash_blocks(p, BS), p, max_tokens)
            if a is not None:
                live.append(a)
        elif op == "release" and live:
            c.release(live.pop(fam % len(live)))
        elif op == "reset":
            c.reset()
        for ev in c.drain_events():
            if isinstance(ev, BlockStored):
                assert not mirror & set(ev.block_hashes), "a block was stored twice"
                assert len(ev.token_ids) == len(ev.block_hashes) * BS
                mirror |= set(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                assert set(ev.block_hashes) <= mirror, "removed a block never stored"
                mirror -= set(ev.block_hashes)
            else:
                mirror.clear()
        for block, added in c.drain_changes():
            if block is None:
                changes.clear()
            elif added:
                changes.add(block)
            else:
                changes.remove(block)
        assert changes == mirror
        assert c.occupied_blocks <= c.capacity
        assert c.cached_blocks == len(mirror) and all(c.contains(d) for d in mirror)
        held = {d for a in live for d in a.block_hashes}
        assert held <= mirror, "a block in use was evicted"
        assert c.used_blocks == len(held) + sum(a.anon_blocks for a in live)
