"""Payloads recorded from the engines' own code (tests/golden/engine_events) through the agent's
parsers and block map, in process: every payload decodes without a parse error, and for every
probe the blocks the agent indexed give the router (same hashing, same salt) exactly the
tokens the engine reuses. The full-stack replay is tests/integration/test_engine_golden.py."""

from __future__ import annotations

import json

import msgspec
import pytest

from kvroute.blocks import hash_blocks, request_salt
from node_agent.block_map import BlockMap
from node_agent.deltas import DeltaLog
from node_agent.events import Stored
from node_agent.parse_sglang import SglangParser
from node_agent.parse_vllm import VllmParser
from router_service.placement import NodeState
from tests.golden_engine import ENGINES, GOLDEN, engine_tiers, load, scenarios

BS = 16
ALL = [(e, s) for e in ENGINES for s in scenarios(e)]


def replay(engine: str, scenario: str, topic: bytes = b"kv-events",
           ) -> tuple[BlockMap, VllmParser | SglangParser]:
    """Apply every batch of the last engine incarnation (as a restart would leave it)."""
    rec = load(engine, scenario)
    parser = SglangParser() if engine.startswith("sglang") else VllmParser()
    bm = BlockMap(BS, DeltaLog())
    last = max(rec.incarnation)
    for frames in rec.frames(last):
        if not frames[0].startswith(topic):
            continue
        batch = parser.parse(frames[2])
        assert batch is not None
        for ev in batch.events:
            bm.apply(ev)
    return bm, parser


def matched(bm: BlockMap, tokens: list[int], lora: str, salt: str) -> int:
    held = set(bm.canonical_hashes())
    n = 0
    for h in hash_blocks(tokens, BS, salt=request_salt(lora or None, None, salt or None)):
        if h not in held:
            break
        n += 1
    return n


def matched_offloaded(bm: BlockMap, tokens: list[int], lora: str, salt: str, dev: int) -> int:
    """Offloaded blocks continuing a device run of ``dev`` blocks (the index's tier walk)."""
    held = set(bm.offloaded_hashes())
    hashes = hash_blocks(tokens, BS, salt=request_salt(lora or None, None, salt or None))
    n = 0
    for h in hashes[dev:]:
        if h not in held:
            break
        n += 1
    return n


def test_every_engine_has_its_recordings_with_provenance() -> None:
    for engine in ENGINES:
        names = scenarios(engine)
        full = {"plain", "lora", "cache_salt", "lora_cache_salt", "late_join", "wrong_topic",
                "offloaded"}
        if engine in ("vllm-0.33.0", "vllm-0.23.0", "sglang-0.5.23"):  # the pinned versions
            assert full - {"offloaded"} <= set(names), engine
        assert "plain" in names, engine
        for sc in names:
            prov = json.loads((GOLDEN / engine / f"{sc}.json").read_text())
            assert len(prov["wheel_sha256"]) == 64 and prov["stubs"] and prov["probes"]
            assert f"{prov['package']}-{prov['version']}" == engine


@pytest.mark.parametrize(("engine", "scenario"), ALL)
def test_recorded_payloads_decode_cleanly(engine: str, scenario: str) -> None:
    _bm, parser = replay(engine, scenario, topic=b"")
    assert not parser.stats.errors, dict(parser.stats.errors)
    assert parser.stats.events > 0


@pytest.mark.parametrize(("engine", "scenario"),
                         [(e, s) for e, s in ALL if s not in ("wrong_topic",)])
def test_indexed_blocks_give_the_router_what_the_engine_reuses(engine: str,
                                                               scenario: str) -> None:
    bm, _ = replay(engine, scenario)
    node = NodeState("n", "n", "m", engine_block_size=bm.engine_block_size,
                     engine_lookahead_tokens=bm.lookahead_tokens)
    for p in load(engine, scenario).probes:
        m = matched(bm, p["tokens"], p["lora_name"], p["cache_salt"])
        got = node.reusable_blocks(m, BS, len(p["tokens"])) * BS
        assert got == p["engine_hit_tokens"] // BS * BS, (p["name"], m, p["engine_hit_tokens"])
        gpu, off = engine_tiers(p)
        low = matched_offloaded(bm, p["tokens"], p["lora_name"], p["cache_salt"], m)
        dev_r, off_r = node.reusable_tiers(m, low, BS, len(p["tokens"]))
        want_total = (gpu + off) // BS * BS
        assert (dev_r * BS, off_r * BS) == (got, want_total - got), (p["name"], m, low)


def test_offloaded_scenarios_are_recorded_from_the_engines() -> None:
    """vLLM 0.33 (medium CPU) and SGLang 0.5.23 (CPU_PINNED, DISK): offloaded stores, tier
    moves (evicted from the GPU, kept offloaded) and offloaded removals, from engine code."""
    for engine in ("vllm-0.33.0", "sglang-0.5.23"):
        assert {"offloaded", "offload_evict"} <= set(scenarios(engine)), engine
        probes = {p["name"]: engine_tiers(p) for p in load(engine, "offload_evict").probes}
        gpu, off = probes["a_gpu_then_cpu"]
        assert gpu > 0 and off > 0, probes  # GPU credit then offloaded credit


def test_vllm_lora_and_salt_come_out_of_extra_keys() -> None:
    for engine in ("vllm-0.33.0", "vllm-0.23.0"):
        rec = load(engine, "lora_cache_salt")
        batch = VllmParser().parse(rec.live[0][2])
        assert batch is not None
        ev = batch.events[0]
        assert isinstance(ev, Stored)
        assert (ev.lora_name, ev.cache_salt, ev.extra_keys) == ("sql-adapter", "tenant-7", None)


def test_multimodal_blocks_are_counted_unmatchable() -> None:
    for engine in ("vllm-0.33.0", "vllm-0.23.0"):
        bm, _ = replay(engine, "multimodal")
        # block 0 is plain text; blocks 1..3 follow the image: never indexed, counted
        assert bm.held_blocks == 1 and bm.skipped["unreproducible_extra_keys"] == 3


def test_sglang_bigram_and_partial_pages() -> None:
    bm, parser = replay("sglang-0.5.23", "bigram")
    assert bm.held_blocks == 4 and not parser.stats.errors
    bm, _ = replay("sglang-0.5.23", "partial_page")
    assert bm.held_blocks == 4 and bm.skipped["partial_block"] == 1
    assert bm.engine_block_size == 16


def test_engine_block_size_and_lookahead_are_learned() -> None:
    assert replay("vllm-0.33.0", "block32")[0].engine_block_size == 32
    assert replay("vllm-0.33.0", "lookahead")[0].lookahead_tokens == 1
    assert replay("sglang-0.5.23", "page1")[0].engine_block_size == 1


def test_recordings_are_byte_stable_msgpack() -> None:
    for engine, sc in ALL:
        raw = (GOLDEN / engine / f"{sc}.msgpack").read_bytes()
        assert msgspec.msgpack.encode(msgspec.msgpack.decode(raw)) == raw


@pytest.mark.parametrize(("matched", "ebs", "look", "prompt", "want"), [
    (4, 0, 0, 69, 4),     # 64 of 69 tokens cached: all reusable
    (4, 0, 0, 64, 3),     # fully cached: the last token is recomputed -> 48
    (3, 32, 0, 80, 2),    # 48 tokens match but the engine reuses whole 32-token blocks
    (6, 32, 0, 96, 4),    # fully cached 96 with 32-token blocks: 95 -> 64 = 4 blocks
    (4, 1, 0, 64, 3),     # SGLang page 1: 63 tokens, the registry can state 48
    (4, 0, 2, 65, 3),     # lookahead 2: hashes cover 63 tokens
    (0, 0, 0, 64, 0),
])
def test_reusable_blocks(matched: int, ebs: int, look: int, prompt: int, want: int) -> None:
    node = NodeState("n", "n", "m", engine_block_size=ebs, engine_lookahead_tokens=look)
    assert node.reusable_blocks(matched, BS, prompt) == want


def test_every_hand_written_shape_is_backed_by_a_recording_or_marked() -> None:
    from tests.unit.payloads import make_payloads as P
    assert set(P.EVIDENCE) == set(P.PAYLOADS)
    for name, rec in P.EVIDENCE.items():
        if rec is not None:
            assert (GOLDEN / f"{rec}.msgpack").exists(), name
