"""Engine blocks -> canonical hashes: chaining, removal, re-chunking, partial pages, media,
salts, and the net heartbeat deltas with acknowledgement."""

from __future__ import annotations

import random

import pytest

from kvroute.blocks import hash_blocks, root_hash
from node_agent.block_map import BlockMap
from node_agent.deltas import DeltaLog
from node_agent.events import Cleared, Removed, Stored
from node_agent.parse_sglang import SglangParser
from tests.unit.payloads import make_payloads as P

TOKS = list(range(1000, 1064))  # 4 blocks of 16


def _map(bs: int = 16, **kw: object) -> tuple[BlockMap, DeltaLog]:
    d = DeltaLog()
    return BlockMap(bs, d, **kw), d  # type: ignore[arg-type]


def _stored(hashes: list[int], parent: int | None, toks: list[int], ebs: int = 16,
            **kw: object) -> Stored:
    return Stored(tuple(hashes), parent, tuple(toks), ebs, **kw)  # type: ignore[arg-type]


def test_runs_chain_through_parents_to_the_routers_hashes() -> None:
    m, d = _map()
    m.apply(_stored([11, 12], None, TOKS[:32]))
    m.apply(_stored([13, 14], 12, TOKS[32:]))
    want = hash_blocks(TOKS, 16)
    assert sorted(m.canonical_hashes()) == sorted(want)
    assert m.canonical_of(14) == (want[3],)
    batch = d.take()
    assert sorted(batch.stored) == sorted(want) and batch.seq == 1


def test_removal_uses_the_engine_hash_map() -> None:
    m, d = _map()
    m.apply(_stored([11, 12], None, TOKS[:32]))
    d.ack(d.take())
    m.apply(Removed((12,)))
    want = hash_blocks(TOKS[:32], 16)
    assert m.canonical_hashes() == [want[0]]
    assert d.take().removed == [want[1]] and m.evictions_total == 1


def test_unknown_parent_is_skipped_and_counted() -> None:
    m, _ = _map()
    m.apply(_stored([13], 999, TOKS[:16]))
    assert m.held_blocks == 0 and m.skipped["orphan"] == 1
    m.apply(Removed((777,)))
    assert m.skipped["unknown_removed"] == 1


@pytest.mark.parametrize("ebs", [1, 4, 8, 32, 64, 12, 24])
def test_engine_block_size_is_rechunked(ebs: int) -> None:
    toks = list(range(5000, 5000 + 96))
    m, _ = _map()
    hashes = list(range(1, 1 + -(-len(toks) // ebs)))
    full = len(toks) // ebs
    # first run: half the engine blocks from the root, second run continues from its parent
    half = max(1, full // 2)
    m.apply(_stored(hashes[:half], None, toks[:half * ebs], ebs))
    if full > half:
        m.apply(_stored(hashes[half:full], hashes[half - 1], toks[half * ebs:full * ebs], ebs))
    covered = full * ebs
    assert sorted(m.canonical_hashes()) == sorted(hash_blocks(toks[:covered], 16))


def test_rechunked_removal_drops_the_canonical_blocks_it_completed() -> None:
    m, _ = _map()
    m.apply(_stored([1, 2], None, TOKS, 32))
    want = hash_blocks(TOKS, 16)
    m.apply(Removed((2,)))
    assert sorted(m.canonical_hashes()) == sorted(want[:2])


def test_partial_last_page_is_never_a_full_block() -> None:
    m, _ = _map()
    batch = SglangParser().parse(P.encode(P.SGLANG_PARTIAL_PAGE))
    assert batch is not None
    for ev in batch.events:
        m.apply(ev)
    assert m.canonical_hashes() == hash_blocks(P.TOKENS[:16], 16)
    assert m.skipped["partial_block"] == 1
    # a later run chained on the partial page cannot be placed
    m.apply(_stored([5], P._signed(P.H2) & (2**64 - 1), TOKS[:16]))
    assert m.skipped["orphan"] == 1 and m.held_blocks == 1
    m.apply(Removed((P.H2,)))
    assert m.skipped["unknown_removed"] == 0


def test_medium_policy_device_reports_offloaded_copies_as_the_lower_tier() -> None:
    m, d = _map()
    c = hash_blocks(TOKS[:32], 16)
    m.apply(_stored([1], None, TOKS[:16], medium="CPU"))
    m.apply(_stored([2], 1, TOKS[16:32], medium="CPU"))  # chains through the offloaded parent
    assert m.held_blocks == 0 and m.offloaded_blocks == 2
    b = d.take()
    assert b.stored == [] and b.stored_offloaded == c
    d.ack(b)
    m.apply(_stored([1], None, TOKS[:16]))  # loaded back onto the GPU: both tiers
    m.apply(Removed((1,), medium="CPU"))
    assert m.held_blocks == 1 and m.offloaded_blocks == 1
    b = d.take()
    assert b.stored == c[:1] and b.removed_offloaded == c[:1]
    m.apply(Removed((1,)))
    assert m.held_blocks == 0 and m.evictions_total == 1 and m.engine_blocks == 1
    m.apply(Cleared())
    assert m.offloaded_blocks == 0 and m.offloaded_hashes() == []


def test_medium_policy_any_keeps_a_block_while_some_medium_holds_it() -> None:
    m, _ = _map(medium_policy="any")
    m.apply(_stored([1], None, TOKS[:16]))
    m.apply(_stored([1], None, TOKS[:16], medium="CPU"))
    m.apply(Removed((1,)))
    assert m.held_blocks == 1
    m.apply(Removed((1,), medium="CPU"))
    assert m.held_blocks == 0


def test_lora_and_cache_salt_start_other_chains() -> None:
    m, _ = _map()
    m.apply(_stored([1], None, TOKS[:16]))
    m.apply(_stored([2], None, TOKS[:16], lora_name="adapter"))
    m.apply(_stored([3], None, TOKS[:16], cache_salt="tenant-a"))
    assert m.canonical_of(1) == tuple(hash_blocks(TOKS[:16], 16))
    assert len(set(m.canonical_hashes())) == 3
    assert root_hash("") != root_hash("lora=adapter")


def test_extra_keys_make_blocks_unmatchable_by_plain_prompts() -> None:
    m, _ = _map()
    m.apply(_stored([1, 2], None, TOKS[:32], extra_keys=(None, ("mm", "img-hash"))))
    plain = hash_blocks(TOKS[:32], 16)
    assert m.canonical_of(1) == (plain[0],)
    assert m.canonical_of(2) != (plain[1],)


def test_other_kv_groups_are_ignored() -> None:
    m, _ = _map()
    m.apply(_stored([1], None, TOKS[:16], group_idx=1))
    assert m.held_blocks == 0 and m.skipped["other_group"] == 1


def test_duplicate_store_and_shared_canonical_blocks_are_refcounted() -> None:
    m, _ = _map()
    m.apply(_stored([1], None, TOKS[:16]))
    m.apply(_stored([1], None, TOKS[:16]))
    m.apply(_stored([9], None, TOKS[:16]))  # another engine id for the same tokens
    assert m.held_blocks == 1
    m.apply(Removed((1,)))
    assert m.held_blocks == 1
    m.apply(Removed((9,)))
    assert m.held_blocks == 0


def test_unchained_engine_hash_reused_after_another_prefix_is_counted() -> None:
    m, _ = _map()
    m.apply(_stored([1, 2], None, TOKS[:32]))
    m.apply(_stored([3], None, TOKS[32:48]))
    m.apply(_stored([2], 3, TOKS[16:32]))  # old SGLang: hash of the page tokens only
    assert m.skipped["engine_hash_conflict"] == 1
    m.apply(_stored([1, 2], None, TOKS[:32]))  # a genuine re-store is not a conflict
    m.apply(_stored([5, 6], None, TOKS[:32], extra_keys=(("img",), None)))
    m.apply(_stored([5, 6], None, TOKS[:32], extra_keys=(("img",), None)))
    assert m.skipped["engine_hash_conflict"] == 1


def test_malformed_run_is_skipped() -> None:
    m, _ = _map()
    m.apply(_stored([1, 2], None, TOKS[:16]))
    assert m.skipped["malformed"] == 1 and m.held_blocks == 0


def test_clear_drops_everything_and_is_sent_first() -> None:
    m, d = _map()
    m.apply(_stored([1, 2], None, TOKS[:32]))
    d.ack(d.take())
    m.apply(Cleared())
    m.apply(_stored([3], None, TOKS[32:48]))
    b = d.take()
    assert b.cleared and b.stored == hash_blocks(TOKS[32:48], 16) and not b.removed
    assert m.held_blocks == 1


def test_trims_oldest_when_over_capacity() -> None:
    m, _ = _map(capacity_blocks=2)
    for i in range(4):
        m.apply(_stored([100 + i], None, TOKS[i * 16:(i + 1) * 16]))
    assert m.held_blocks == 2 and m.skipped["trimmed"] == 2
    assert m.canonical_of(103) is not None and m.canonical_of(100) is None


# --- deltas ------------------------------------------------------------------------------
def test_net_deltas() -> None:
    d = DeltaLog()
    d.stored(1)
    d.removed(1)  # store then remove: only the removal is left (harmless if unknown)
    d.removed(2)
    d.stored(2)  # remove then store: only the store is left
    b = d.take()
    assert (b.stored, b.removed, b.seq) == ([2], [1], 1)


def test_unacked_batch_is_resent_with_the_same_seq_and_new_changes_wait() -> None:
    d = DeltaLog()
    d.stored(1)
    first = d.take()
    d.stored(2)
    again = d.take()
    assert again is first and again.seq == 1 and again.stored == [1]
    d.ack(again)
    nxt = d.take()
    assert (nxt.seq, nxt.stored) == (2, [2])
    d.ack(nxt)
    empty = d.take()
    assert empty.empty and empty.seq == 2


def test_batches_are_capped() -> None:
    d = DeltaLog(max_hashes_per_batch=3)
    for h in range(5):
        d.stored(h)
    d.removed(99)
    b1 = d.take()
    assert len(b1.stored) + len(b1.removed) == 3 and b1.removed == [99]
    d.ack(b1)
    b2 = d.take()
    assert b2.seq == 2 and len(b2.stored) == 3
    assert sorted(b1.stored + b2.stored) == list(range(5))


def test_reset_and_renumber() -> None:
    d = DeltaLog()
    d.stored(1)
    d.take()
    d.reset(1)
    d.stored(2)
    d.renumber(1)
    b = d.take()
    assert (b.seq, b.stored) == (1, [2])


def test_random_event_streams_match_a_model() -> None:
    """The map's canonical set equals the hashes of every engine block currently stored."""
    rng = random.Random(7)
    m, _ = _map()
    live: dict[int, list[int]] = {}  # engine hash -> token prefix
    nxt = 1
    for _ in range(400):
        if live and rng.random() < 0.35:
            eh = rng.choice(list(live))
            m.apply(Removed((eh,)))
            del live[eh]
            continue
        parent = rng.choice([None, *live]) if live else None
        prefix = [] if parent is None else live[parent]
        n = rng.randint(1, 3)
        toks = [rng.randint(0, 50) for _ in range(16 * n)]
        hashes = list(range(nxt, nxt + n))
        nxt += n
        m.apply(_stored(hashes, parent, toks))
        for i, eh in enumerate(hashes):
            live[eh] = prefix + toks[: (i + 1) * 16]
    want = {hash_blocks(p, 16)[-1] for p in live.values()}
    assert set(m.canonical_hashes()) == want
