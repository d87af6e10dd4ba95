"""Canonical block hashing: properties the whole system relies on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.blocks import HASH_SCHEME, BlockHasher, hash_blocks, root_hash

tokens = st.lists(st.integers(0, 2**32 - 1), max_size=200)
sizes = st.integers(1, 32)


@given(prefix=tokens, a=tokens, b=tokens, bs=sizes)
def test_shared_prefix_gives_equal_leading_hashes(prefix: list[int], a: list[int], b: list[int],
                                                  bs: int) -> None:
    ha = hash_blocks(prefix + a, bs)
    hb = hash_blocks(prefix + b, bs)
    shared = len(prefix) // bs
    assert ha[:shared] == hb[:shared]


@given(toks=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=200), bs=sizes,
       data=st.data())
def test_change_in_block_i_changes_hashes_from_i_only(toks: list[int], bs: int,
                                                      data: st.DataObject) -> None:
    n = len(toks) // bs
    if n == 0:
        return
    pos = data.draw(st.integers(0, n * bs - 1))
    changed = list(toks)
    changed[pos] = (changed[pos] + 1) % 2**32
    before, after = hash_blocks(toks, bs), hash_blocks(changed, bs)
    i = pos // bs
    assert before[:i] == after[:i]
    assert all(x != y for x, y in zip(before[i:], after[i:], strict=True))


@given(toks=tokens)
def test_block_size_one_hashes_every_token(toks: list[int]) -> None:
    assert len(hash_blocks(toks, 1)) == len(toks)


@given(toks=tokens, bs=sizes)
def test_only_full_blocks_are_hashed(toks: list[int], bs: int) -> None:
    assert len(hash_blocks(toks, bs)) == len(toks) // bs


def test_prompt_shorter_than_a_block_has_no_hashes() -> None:
    assert hash_blocks([1, 2, 3], 16) == []
    assert hash_blocks([], 16) == []


@given(toks=tokens, bs=sizes)
def test_list_and_array_inputs_agree(toks: list[int], bs: int) -> None:
    assert hash_blocks(toks, bs) == hash_blocks(np.array(toks, dtype=np.uint32), bs)


@settings(max_examples=50)
@given(toks=st.lists(st.integers(0, 1000), min_size=32, max_size=128), bs=sizes)
def test_continue_chain_equals_hashing_the_whole(toks: list[int], bs: int) -> None:
    whole = hash_blocks(toks, bs)
    k = len(whole) // 2
    if k == 0:
        return
    rest = hash_blocks(toks[k * bs:], bs, parent=whole[k - 1])
    assert whole[k:] == rest


def test_salt_changes_every_hash() -> None:
    toks = list(range(64))
    plain, salted = hash_blocks(toks, 16), hash_blocks(toks, 16, salt="lora-a")
    assert all(a != b for a, b in zip(plain, salted, strict=True))
    assert root_hash("x") != root_hash("")


def test_hashes_are_stable_across_processes() -> None:
    # Pinned values: a change here breaks every deployed agent/registry pair, so it must come
    # with a new HASH_SCHEME.
    assert HASH_SCHEME == "xxh3_64-chain-v1"
    assert hash_blocks(list(range(32)), 16) == [12563744378259133256, 1367550630286537070]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks([1, 2], 0)
    with pytest.raises(ValueError, match="token ids"):
        hash_blocks([-1] * 16, 16)
    with pytest.raises(ValueError, match="token ids"):
        hash_blocks([2**32] * 16, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockHasher(0)


def test_hasher_object() -> None:
    h = BlockHasher(4, salt="m")
    assert h(list(range(9))) == hash_blocks(list(range(9)), 4, salt="m")
    assert h.full_blocks(9) == 2
