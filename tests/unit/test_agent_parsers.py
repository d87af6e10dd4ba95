"""Engine payload parsers: every recorded wire shape decodes to the same internal events, and
nothing malformed ever raises out of a parser (counted instead)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent.block_map import BlockMap
from node_agent.deltas import DeltaLog
from node_agent.events import Cleared, Event, ParsedBatch, Removed, Stored
from node_agent.parse_sglang import SglangParser
from node_agent.parse_vllm import VllmParser
from tests.unit.payloads import make_payloads as P

PAYLOAD_DIR = Path(P.__file__).parent
VLLM_SHAPES = ["vllm_v090_positional_2elem", "vllm_positional_3elem", "vllm_bytes_hashes",
               "vllm_positional_newer_fields", "vllm_map", "vllm_map_newer_keys"]
SGLANG_SHAPES = ["sglang_positional", "sglang_map"]

EXPECTED: list[Event] = [
    Stored(engine_hashes=(P.H1, P.H2), parent_engine_hash=None, token_ids=tuple(P.TOKENS),
           block_size=16),
    Stored(engine_hashes=(P.H1 ^ 1,), parent_engine_hash=P.H2, token_ids=tuple(P.TOKENS2),
           block_size=16),
    Removed(engine_hashes=(P.H1,)),
    Cleared(),
]


def _norm(ev: Event) -> Any:
    """The fields that must agree across shapes (group 0 and None both mean the main group)."""
    if isinstance(ev, Stored):
        return ("stored", ev.engine_hashes, ev.parent_engine_hash, ev.token_ids, ev.block_size,
                ev.medium, ev.lora_id, ev.lora_name, ev.cache_salt, ev.group_idx or 0)
    if isinstance(ev, Removed):
        return ("removed", ev.engine_hashes, ev.medium, ev.group_idx or 0)
    return ("cleared",)


def _load(name: str) -> bytes:
    return (PAYLOAD_DIR / f"{name}.msgpack").read_bytes()


@pytest.mark.parametrize("name", list(P.PAYLOADS))
def test_recorded_files_match_their_literal_structures(name: str) -> None:
    assert _load(name) == P.encode(P.PAYLOADS[name])


@pytest.mark.parametrize(("name", "parser"), [(n, VllmParser) for n in VLLM_SHAPES]
                         + [(n, SglangParser) for n in SGLANG_SHAPES])
def test_every_shape_decodes_to_the_same_events(name: str, parser: type[VllmParser]) -> None:
    p = parser()
    batch = p.parse(_load(name))
    assert batch is not None
    assert [_norm(e) for e in batch.events] == [_norm(e) for e in EXPECTED]
    assert batch.ts == P.TS
    assert not p.stats.errors
    assert p.stats.events == 4


def test_batch_shapes_and_dp_rank() -> None:
    p = VllmParser()
    two = p.parse(_load("vllm_v090_positional_2elem"))
    three = p.parse(_load("vllm_positional_3elem"))
    newer = p.parse(_load("vllm_positional_newer_fields"))
    assert two is not None and three is not None and newer is not None
    assert (two.dp_rank, three.dp_rank, newer.dp_rank) == (None, 0, 1)


def test_medium_defaults_to_device_when_absent() -> None:
    batch = VllmParser().parse(_load("vllm_v090_positional_2elem"))
    assert batch is not None and isinstance(batch.events[0], Stored)
    assert batch.events[0].medium == "GPU"


@pytest.mark.parametrize("name", ["sglang_map_cache_salt", "sglang_positional_metadata_salt"])
def test_sglang_cache_salt(name: str) -> None:
    batch = SglangParser().parse(_load(name))
    assert batch is not None
    (ev,) = batch.events
    assert isinstance(ev, Stored) and ev.cache_salt == "tenant-a"
    assert ev.engine_hashes == (P.H1,)


def test_sglang_partial_page_is_passed_through_with_its_length() -> None:
    batch = SglangParser().parse(_load("sglang_partial_page"))
    assert batch is not None
    full, partial = batch.events
    assert isinstance(partial, Stored) and len(partial.token_ids) == 5
    assert isinstance(full, Stored) and partial.parent_engine_hash == full.engine_hashes[0]


BAD_EVENTS: list[tuple[Any, str]] = [
    (["BlockMoved", [1]], "unknown_event"),
    ({"type": "Quantum"}, "unknown_event"),
    ({"block_hashes": [1]}, "event_shape"),
    ([], "event_shape"),
    ("BlockStored", "event_shape"),
    (["BlockStored", "notalist", None, [1], 16, None], "field_type"),
    (["BlockStored", [1.5], None, [1], 16, None], "hash_type"),
    (["BlockStored", [1], None, ["a"], 16, None], "field_type"),
    (["BlockStored", [1], None, [-1], 16, None], "field_type"),
    (["BlockStored", [1], None, [1], "16", None], "field_type"),
    (["BlockStored", [1], None, [1], 0, None], "field_type"),
    (["BlockStored", [1], None], "missing_field"),
    (["BlockStored", [1], None, [1], 16, None, 7], "field_type"),
    (["BlockRemoved"], "missing_field"),
    (["BlockRemoved", [b""]], "hash_type"),
    ({"type": "BlockStored", "block_hashes": [1], "token_ids": [True], "block_size": 1},
     "field_type"),
]


@pytest.mark.parametrize(("raw", "reason"), BAD_EVENTS)
def test_bad_events_are_counted_and_skipped(raw: Any, reason: str) -> None:
    p = VllmParser()
    good = ["AllBlocksCleared"]
    batch = p.parse(msgspec.msgpack.encode([1.0, [good, raw, good], 0]))
    assert batch is not None and batch.events == (Cleared(), Cleared())
    assert p.stats.errors == {reason: 1}


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "msgpack"),
    (P.encode(P.VLLM_MAP)[:-7], "msgpack"),  # truncated
    (b"\xc1", "msgpack"),  # never-used msgpack byte
    (msgspec.msgpack.encode({"x": 1}), "batch_shape"),
    (msgspec.msgpack.encode([1.0]), "batch_shape"),
    (msgspec.msgpack.encode(["ts", []]), "batch_shape"),
    (msgspec.msgpack.encode([1.0, {"not": "a list"}]), "batch_shape"),
    (msgspec.msgpack.encode(42), "batch_shape"),
])
def test_bad_payloads_are_counted(payload: bytes, reason: str) -> None:
    for parser in (VllmParser(), SglangParser()):
        assert parser.parse(payload) is None
        assert parser.stats.errors == {reason: 1}


# --- fuzz ------------------------------------------------------------------------------------
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=40)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type", "GPU"]),
    lambda children: st.lists(children, max_size=8)
    | st.dictionaries(st.sampled_from(["type", "block_hashes", "parent_block_hash",
                                       "token_ids", "block_size", "medium", "cache_salt",
                                       "metadata", "extra_keys", "x"]) | st.text(max_size=5),
                      children, max_size=8),
    max_leaves=40,
)
event_like = st.one_of(
    st.tuples(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared"]),
              ).map(list) | st.lists(msgpack_values, max_size=9).map(
        lambda xs: ["BlockStored", *xs]) | msgpack_values)


def _check(parser: VllmParser | SglangParser, payload: bytes) -> None:
    before = sum(parser.stats.errors.values()) + parser.stats.events
    out = parser.parse(payload)
    assert out is None or isinstance(out, ParsedBatch)
    after = sum(parser.stats.errors.values()) + parser.stats.events
    assert after > before or (out is not None and not out.events)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_never_raise(data: bytes) -> None:
    _check(VllmParser(), data)
    _check(SglangParser(), data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.floats(allow_nan=False) | msgpack_values, st.lists(event_like, max_size=6),
       msgpack_values)
def test_fuzz_random_msgpack_structures_never_raise(ts: Any, events: list[Any],
                                                     rank: Any) -> None:
    payload = msgspec.msgpack.encode([ts, events, rank])
    for parser in (VllmParser(), SglangParser()):
        _check(parser, payload)
        out = parser.parse(payload)
        bmap = BlockMap(16, DeltaLog(), capacity_blocks=8)
        for ev in out.events if out is not None else ():
            bmap.apply(ev)  # whatever decoded is safe to apply
        # every event is either decoded or counted, exactly once per parse
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            assert parser.stats.events + sum(parser.stats.errors.values()) == 2 * len(events)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(P.PAYLOADS)), st.integers(0, 10_000), st.integers(0, 255))
def test_fuzz_mutated_recorded_payloads_never_raise(name: str, pos: int, byte: int) -> None:
    data = bytearray(P.encode(P.PAYLOADS[name]))
    data[pos % len(data)] = byte
    _check(VllmParser(), bytes(data))
    _check(SglangParser(), bytes(data[: pos % (len(data) + 1)]))


def test_vllm_extra_keys_split_into_lora_salt_and_unreproducible_keys() -> None:
    from node_agent.parse_vllm import split_extra_keys
    # LoRA name in every block, salt only in the prompt's first block (vLLM's order)
    assert split_extra_keys((("a", "s"), ("a",)), "a", True) == ("s", None)
    # a run that continues a prompt: a string there is not a salt, it stays (unmatchable)
    assert split_extra_keys((("s",),), None, False) == (None, (("s",),))
    # multimodal (id, offset) pairs and embedding digests stay per block
    salt, rest = split_extra_keys((None, (("img", 4), "s2")), None, True)
    assert salt is None and rest == (None, (("img", 4), "s2"))
    assert split_extra_keys(None, "a", True) == (None, None)


def test_bigram_pages_read_as_tokens_and_bad_pairs_are_counted() -> None:
    ev = {"type": "BlockStored", "block_hashes": [-5], "parent_block_hash": None,
          "token_ids": [[7, 8], [8, 9], [9, 10]], "block_size": 3, "lora_id": None}
    p = SglangParser()
    batch = p.parse(msgspec.msgpack.encode([1.0, [ev], 0]))
    assert batch is not None and batch.events[0].token_ids == (7, 8, 9)  # type: ignore[union-attr]
    ev["token_ids"] = [[7, 8], [5, 9]]  # does not chain
    p.parse(msgspec.msgpack.encode([1.0, [ev], 0]))
    assert p.stats.errors["field_type"] == 1


def test_sglang_lora_name_is_read() -> None:
    ev = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
          "token_ids": list(range(16)), "block_size": 16, "lora_id": None,
          "cache_salt": "t", "session_id": "x", "lora_name": "sql"}
    batch = SglangParser().parse(msgspec.msgpack.encode([1.0, [ev], 0]))
    assert batch is not None
    got = batch.events[0]
    assert isinstance(got, Stored) and (got.lora_name, got.cache_salt) == ("sql", "t")
