"""BlockIndex: longest cached prefix per node, removals, node enumeration."""

from __future__ import annotations

import random

from registry_service.index import BlockIndex


def test_longest_prefix_per_node() -> None:
    idx = BlockIndex()
    idx.add(0, [1, 2, 3, 4])
    idx.add(1, [1, 2])
    idx.add(2, [9])
    assert idx.longest_prefix([1, 2, 3, 5], 0b111) == {0: 3, 1: 2}
    assert idx.longest_prefix([1, 2, 3, 4, 6], 0b001) == {0: 4}
    assert idx.longest_prefix([5, 1, 2], 0b111) == {}  # block 0 must match
    assert idx.longest_prefix([1, 2, 3, 4], 0b010) == {1: 2}  # only candidates count
    assert idx.longest_prefix([], 0b111) == {}


def test_remove_clear_drop_and_counts() -> None:
    idx = BlockIndex()
    idx.add(0, [1, 2, 3])
    idx.add(1, [1, 2, 3])
    assert idx.entries == 6 and idx.entries_blocks() == 3
    assert idx.remove(0, [2, 42]) == 1
    assert idx.longest_prefix([1, 2, 3], 0b11) == {0: 1, 1: 3}
    assert idx.blocks(0).tolist() == [1, 3]
    assert idx.clear(1) == 3 and idx.count(1) == 0
    assert idx.entries_blocks() == 2
    assert idx.drop_node(0) == 2 and idx.entries == 0 and idx.entries_blocks() == 0


def test_matches_a_naive_model_under_random_churn() -> None:
    rng = random.Random(7)
    idx = BlockIndex()
    model: dict[int, set[int]] = {s: set() for s in range(70)}  # masks beyond 64 bits too
    for _ in range(3000):
        slot = rng.randrange(70)
        hs = [rng.randrange(200) for _ in range(rng.randrange(1, 30))]
        if rng.random() < 0.6:
            idx.add(slot, hs)
            model[slot].update(hs)
        elif rng.random() < 0.95:
            idx.remove(slot, hs)
            model[slot].difference_update(hs)
        else:
            idx.clear(slot)
            model[slot].clear()
    for slot, blocks in model.items():
        assert idx.blocks(slot).tolist() == sorted(blocks)
        assert idx.count(slot) == len(blocks)
    query = list(range(200))
    expect = {}
    for slot, blocks in model.items():
        n = 0
        while n < len(query) and query[n] in blocks:
            n += 1
        if n:
            expect[slot] = n
    assert idx.longest_prefix(query, (1 << 70) - 1) == expect


def test_full_64_bit_hashes() -> None:
    idx = BlockIndex()
    big = [2**64 - 1, 2**63 + 5, 2**60 + 1]
    idx.add(3, big)
    assert idx.longest_prefix(big, 1 << 3) == {3: 3}
    assert idx.blocks(3).tolist() == sorted(big)  # full values kept for snapshots
    assert idx.remove(3, [2**63 + 5]) == 1
    assert idx.longest_prefix(big, 1 << 3) == {3: 1}
