"""The PrefixIndex behaviour suite: every implementation in kvroute.index passes every test.

As llm-d-kv-cache runs one suite over its index backends: add an implementation to
``IMPLEMENTATIONS`` and it is held to the same contract (:mod:`kvroute.index.base`), including a
randomized comparison against the reference implementation under churn.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.index import DEVICE, OFFLOADED, BitmaskIndex, PrefixIndex, SlotTable
from kvroute.index.reference import ReferenceIndex

IMPLEMENTATIONS: dict[str, Callable[[], PrefixIndex]] = {
    "bitmask": BitmaskIndex,
    "reference": ReferenceIndex,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def make(request: pytest.FixtureRequest) -> Callable[[], PrefixIndex]:
    factory: Callable[[], PrefixIndex] = IMPLEMENTATIONS[request.param]
    return factory


def test_longest_prefix_per_node(make: Callable[[], PrefixIndex]) -> None:
    idx = make()
    idx.add(0, [1, 2, 3, 4])
    idx.add(1, [1, 2])
    idx.add(2, [9])
    assert idx.longest_prefix([1, 2, 3, 5], 0b111) == {0: 3, 1: 2}
    assert idx.longest_prefix([1, 2, 3, 4, 6], 0b001) == {0: 4}
    assert idx.longest_prefix([5, 1, 2], 0b111) == {}  # block 0 must match
    assert idx.longest_prefix([1, 2, 3, 4], 0b010) == {1: 2}  # only candidates count
    assert idx.longest_prefix([1, 2, 3, 4], 0) == {}
    assert idx.longest_prefix([], 0b111) == {}
    assert idx.longest_prefix([1, 3, 4], 0b111) == {0: 3, 1: 1}  # 3 missing ends 1's run


def test_add_remove_are_idempotent_and_counted(make: Callable[[], PrefixIndex]) -> None:
    idx = make()
    assert idx.add(0, [1, 2, 2, 3]) == 3  # a duplicate in one call counts once
    assert idx.add(0, [1, 2]) == 0
    assert idx.remove(0, [2, 2, 42]) == 1
    assert idx.remove(0, [2]) == 0
    assert idx.remove(7, [1]) == 0  # unknown slot
    assert idx.count(0) == 2 and idx.count(7) == 0 and idx.entries == 2


def test_remove_clear_drop_and_counts(make: Callable[[], PrefixIndex]) -> None:
    idx = make()
    idx.add_node(5)
    assert idx.count(5) == 0 and idx.blocks(5).tolist() == []
    idx.add(0, [1, 2, 3])
    idx.add(1, [1, 2, 3])
    assert idx.entries == 6 and idx.entries_blocks() == 3
    assert idx.remove(0, [2, 42]) == 1
    assert idx.longest_prefix([1, 2, 3], 0b11) == {0: 1, 1: 3}
    assert idx.blocks(0).tolist() == [1, 3]
    assert idx.clear(1) == 3 and idx.count(1) == 0
    assert idx.longest_prefix([1], 0b11) == {0: 1}
    assert idx.entries_blocks() == 2
    assert idx.add(1, [3]) == 1  # a cleared slot stays usable
    assert idx.drop_node(0) == 2 and idx.drop_node(1) == 1
    assert idx.entries == 0 and idx.entries_blocks() == 0
    assert idx.approx_bytes() >= 0


def test_stored_again_after_removal(make: Callable[[], PrefixIndex]) -> None:
    idx = make()
    for _ in range(3):
        idx.add(2, [10, 11])
        idx.remove(2, [10])
    idx.add(2, [10])
    assert idx.blocks(2).tolist() == [10, 11] and idx.count(2) == 2
    assert idx.longest_prefix([10, 11], 1 << 2) == {2: 2}


def test_full_64_bit_hashes(make: Callable[[], PrefixIndex]) -> None:
    idx = make()
    big = [2**64 - 1, 2**63 + 5, 2**60 + 1]
    idx.add(3, big)
    assert idx.longest_prefix(big, 1 << 3) == {3: 3}
    assert idx.blocks(3).tolist() == sorted(big)  # full values kept for snapshots
    assert idx.remove(3, [2**63 + 5]) == 1
    assert idx.longest_prefix(big, 1 << 3) == {3: 1}


def test_many_slots_beyond_machine_words(make: Callable[[], PrefixIndex]) -> None:
    idx = make()
    for slot in range(0, 1100, 7):
        idx.add(slot, range(slot % 5 + 1))  # slot s holds blocks 0..s%5
    got = idx.longest_prefix([0, 1, 2, 3, 4, 5], (1 << 1100) - 1)
    assert got == {s: s % 5 + 1 for s in range(0, 1100, 7)}
    assert idx.longest_prefix([0, 1], 1 << 1099 | 1 << 8) == {1099: 2}


def test_matches_the_reference_under_random_churn(make: Callable[[], PrefixIndex]) -> None:
    rng = random.Random(7)
    idx, ref = make(), ReferenceIndex()
    for _ in range(3000):
        slot = rng.randrange(70)  # masks beyond 64 bits too
        hs = [rng.randrange(200) for _ in range(rng.randrange(1, 30))]
        op = rng.random()
        if op < 0.6:
            assert idx.add(slot, hs) == ref.add(slot, hs)
        elif op < 0.95:
            assert idx.remove(slot, hs) == ref.remove(slot, hs)
        else:
            assert idx.clear(slot) == ref.clear(slot)
    for slot in range(70):
        assert idx.blocks(slot).tolist() == ref.blocks(slot).tolist()
        assert idx.count(slot) == ref.count(slot)
    assert idx.entries == ref.entries and idx.entries_blocks() == ref.entries_blocks()
    for _ in range(50):
        start = rng.randrange(200)
        query = [(start + i) % 200 for i in range(rng.randrange(0, 40))]
        mask = rng.getrandbits(70)
        assert idx.longest_prefix(query, mask) == ref.longest_prefix(query, mask)


def test_tiers_are_independent_sets(make: Callable[[], PrefixIndex]) -> None:
    idx = make()
    assert not idx.has_lower_tier()
    assert idx.add(0, [1, 2, 3]) == 3
    assert idx.add(0, [2, 3, 4], tier=OFFLOADED) == 3  # 2 and 3 on both tiers
    assert idx.has_lower_tier()
    assert idx.count(0) == 3 and idx.count(0, OFFLOADED) == 3 and idx.entries == 6
    assert idx.blocks(0, OFFLOADED).tolist() == [2, 3, 4]
    assert idx.remove(0, [3], tier=OFFLOADED) == 1  # removes that tier only
    assert idx.blocks(0).tolist() == [1, 2, 3] and idx.blocks(0, OFFLOADED).tolist() == [2, 4]
    assert idx.longest_prefix([1, 2, 3, 4], 1) == {0: 3}  # device only
    assert idx.clear(0) == 5 and idx.entries == 0 and not idx.has_lower_tier()
    idx.add(1, [7], tier=OFFLOADED)
    assert idx.drop_node(1) == 1 and idx.count(1, OFFLOADED) == 0


def test_tiered_prefix_gives_device_then_lower_tier_credit(
        make: Callable[[], PrefixIndex]) -> None:
    idx = make()
    idx.add(0, [1, 2])  # GPU: blocks 0-1
    idx.add(0, [1, 2, 3, 4], tier=OFFLOADED)  # CPU copies + blocks 2-3 offloaded
    idx.add(1, [1, 2, 3], tier=OFFLOADED)  # CPU only
    idx.add(2, [1, 2, 3, 4, 5])  # all on GPU
    idx.add(3, [1, 3, 4])  # GPU with a hole at block 1
    idx.add(3, [4], tier=OFFLOADED)
    idx.add(4, [2, 3], tier=OFFLOADED)  # no block 0 anywhere: nothing
    got = idx.tiered_prefix([1, 2, 3, 4, 5], 0b11111)
    assert got == {0: (2, 2), 1: (0, 3), 2: (5, 0), 3: (1, 0)}
    assert idx.tiered_prefix([1, 2, 3, 4, 5], 0b00010) == {1: (0, 3)}  # candidates only
    assert idx.tiered_prefix([], 0b11111) == {} and idx.tiered_prefix([9], 0b11111) == {}


def test_tiered_prefix_after_the_device_run_counts_only_the_lower_tier(
        make: Callable[[], PrefixIndex]) -> None:
    """A block back on GPU after an offloaded one does not extend the match: the engine's
    offloading store is asked from the device hit on and stops at the first block it lacks."""
    idx = make()
    idx.add(0, [1, 3])
    idx.add(0, [2], tier=OFFLOADED)
    assert idx.tiered_prefix([1, 2, 3], 1) == {0: (1, 1)}


def test_a_block_moving_tiers(make: Callable[[], PrefixIndex]) -> None:
    """Evicted from GPU but kept on CPU: the block moves from device to lower-tier credit."""
    idx = make()
    idx.add(0, [1, 2, 3])
    idx.add(0, [1, 2, 3], tier=OFFLOADED)
    assert idx.tiered_prefix([1, 2, 3], 1) == {0: (3, 0)}
    idx.remove(0, [3])
    assert idx.tiered_prefix([1, 2, 3], 1) == {0: (2, 1)}
    idx.remove(0, [1, 2, 3], tier=OFFLOADED)
    assert idx.tiered_prefix([1, 2, 3], 1) == {0: (2, 0)}


def test_tiered_prefix_matches_the_reference_under_random_churn(
        make: Callable[[], PrefixIndex]) -> None:
    rng = random.Random(11)
    idx, ref = make(), ReferenceIndex()
    for _ in range(3000):
        slot, tier = rng.randrange(70), rng.choice((DEVICE, OFFLOADED))
        hs = [rng.randrange(40) for _ in range(rng.randrange(1, 12))]
        op = rng.random()
        if op < 0.55:
            assert idx.add(slot, hs, tier) == ref.add(slot, hs, tier)
        elif op < 0.97:
            assert idx.remove(slot, hs, tier) == ref.remove(slot, hs, tier)
        else:
            assert idx.clear(slot) == ref.clear(slot)
    for slot in range(70):
        for tier in (DEVICE, OFFLOADED):
            assert idx.blocks(slot, tier).tolist() == ref.blocks(slot, tier).tolist()
            assert idx.count(slot, tier) == ref.count(slot, tier)
    assert idx.entries == ref.entries and idx.entries_blocks() == ref.entries_blocks()
    for _ in range(200):
        start = rng.randrange(40)
        query = [(start + i) % 40 for i in range(rng.randrange(0, 20))]
        mask = rng.getrandbits(70)
        assert idx.tiered_prefix(query, mask) == ref.tiered_prefix(query, mask)
        assert idx.longest_prefix(query, mask) == ref.longest_prefix(query, mask)


ops = st.lists(st.tuples(st.sampled_from(["add", "remove", "add_low", "remove_low", "clear",
                                          "drop"]),
                         st.integers(0, 9), st.lists(st.integers(0, 15), max_size=8)),
               max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, query=st.lists(st.integers(0, 15), max_size=10), mask=st.integers(0, 1023))
def test_every_implementation_agrees_with_the_reference(
        ops: list[tuple[str, int, list[int]]], query: list[int], mask: int) -> None:
    indexes = {name: f() for name, f in IMPLEMENTATIONS.items()}
    ref = indexes["reference"]
    for op, slot, hs in ops:
        results = {}
        for name, idx in indexes.items():
            if op == "add":
                results[name] = idx.add(slot, hs)
            elif op == "remove":
                results[name] = idx.remove(slot, hs)
            elif op == "add_low":
                results[name] = idx.add(slot, hs, tier=OFFLOADED)
            elif op == "remove_low":
                results[name] = idx.remove(slot, hs, tier=OFFLOADED)
            elif op == "clear":
                results[name] = idx.clear(slot)
            else:
                results[name] = idx.drop_node(slot)
        assert len(set(results.values())) == 1, (op, slot, hs, results)
    for idx in indexes.values():
        assert idx.longest_prefix(query, mask) == ref.longest_prefix(query, mask)
        assert idx.tiered_prefix(query, mask) == ref.tiered_prefix(query, mask)
        assert [idx.count(s) for s in range(10)] == [ref.count(s) for s in range(10)]
        assert [idx.count(s, OFFLOADED) for s in range(10)] == \
            [ref.count(s, OFFLOADED) for s in range(10)]


def test_slot_table_reuses_lowest_free_slot_and_tracks_models() -> None:
    t = SlotTable()
    assert [t.assign(n, "m") for n in "abc"] == [0, 1, 2]
    assert t.assign("d", "other") == 3
    assert t.model_mask("m") == 0b0111 and t.model_mask("other") == 0b1000
    assert t.assign("b", "m") == 1  # known: same slot
    assert t.release("b") == 1 and t.release("b") is None
    assert t.model_mask("m") == 0b0101 and "b" not in t and len(t) == 3
    assert t.assign("e", "m") == 1  # lowest free slot first
    assert t.assign("e", "other") == 1  # moves model, keeps slot
    assert t.model_mask("m") == 0b0101 and t.model_mask("other") == 0b1010
    t.release("d")
    t.release("e")
    assert t.models() == {"m"} and t.all_mask() == 0b0101 and t.model_mask("other") == 0


def test_slot_table_knows_the_node_at_each_slot() -> None:
    t = SlotTable()
    t.assign("a", "m")
    t.assign("b", "m")
    assert t.node_at(0) == "a" and t.node_at(1) == "b" and t.node_at(2) is None
    t.release("a")
    assert t.node_at(0) is None
    t.assign("c", "x")
    assert t.node_at(0) == "c"
