"""Workloads: Mooncake parsing and the shipped sample, generated conversations and prompts."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest

from bench.workloads import SAMPLE_TRACE, TraceFormatError, load_mooncake, load_workload
from bench.workloads.generated import (
    ConversationSpec,
    SystemPromptSpec,
    conversations,
    system_prompt,
)


def test_shipped_sample_matches_its_notice() -> None:
    data = SAMPLE_TRACE.read_bytes()
    notice = (SAMPLE_TRACE.parent / "NOTICE").read_text()
    assert hashlib.sha256(data).hexdigest() in notice
    assert "MODIFIED (TRUNCATED)" in notice and "Apache License 2.0" in notice
    assert "Apache License" in (SAMPLE_TRACE.parent / "LICENSE-APACHE").read_text()
    wl = load_workload(workload="mooncake-sample")
    assert len(wl.requests) == 1500 and wl.block_size == 512
    first = wl.requests[0]
    assert first.block_hashes[0] == 0 and first.arrival_s == 0.0
    assert len(first.block_hashes) == -(-first.prompt_tokens // 512)
    assert first.prompt_text_head.startswith("0 1 2") and len(first.prompt_text_head) <= 50


def test_mooncake_slices_rebase_arrivals(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000 * i + 500, "input_length": 600, "output_length": 5,
             "hash_ids": [0, i + 1]} for i in range(5)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    wl = load_mooncake(p, start=2, limit=2)
    assert [r.block_hashes for r in wl.requests] == [(0, 3), (0, 4)]
    assert [r.arrival_s for r in wl.requests] == [0.0, 1.0]
    assert wl.requests[0].cached_tokens(2, 512) == 600  # partial last block


def test_bad_trace_line_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]}\n'
                 '{"timestamp": 1}\n')
    with pytest.raises(TraceFormatError, match=r"bad.jsonl:2"):
        load_mooncake(p)


def test_conversation_turns_extend_the_previous_prompt() -> None:
    wl = conversations(7, ConversationSpec(conversations=5, turns=4, start_window_s=10.0))
    assert len(wl.requests) == 20
    by_conv: dict[str, list] = {}
    for r in wl.requests:
        by_conv.setdefault(r.session_key or "", []).append(r)
    arrivals = [r.arrival_s for r in wl.requests]
    assert arrivals == sorted(arrivals)
    for turns in by_conv.values():
        turns.sort(key=lambda r: r.arrival_s)
        for prev, nxt in itertools.pairwise(turns):
            # the next prompt = previous prompt + answer + new message: its full blocks start
            # with every full block of the previous prompt (same canonical hashes)
            assert nxt.block_hashes[: len(prev.block_hashes)] == prev.block_hashes
            assert nxt.prompt_tokens > prev.prompt_tokens
    # deterministic from the seed
    again = conversations(7, ConversationSpec(conversations=5, turns=4, start_window_s=10.0))
    assert [r.block_hashes for r in again.requests] == [r.block_hashes for r in wl.requests]


def test_stack_prompts_are_as_long_as_the_workload_says() -> None:
    """The stack sends every prompt token the in-process replay counts: a generated prompt's
    partial last block (no hash) gets tokens from the request id, so hit rates of the two modes
    share one denominator; equal block hashes still give equal tokens."""
    from bench.prompts import synth_tokens

    wl = conversations(7, ConversationSpec(conversations=5, turns=4, start_window_s=10.0))
    bs = wl.block_size
    assert any(r.prompt_tokens > len(r.block_hashes) * bs for r in wl.requests)
    for r in wl.requests:
        toks = synth_tokens(r, bs)
        assert len(toks) == r.prompt_tokens and toks == synth_tokens(r, bs)
        assert all(0 < t < 32_000 for t in toks)
    a, b = wl.requests[0], next(r for r in wl.requests[1:]
                                if r.session_key == wl.requests[0].session_key)
    full = len(a.block_hashes) * bs
    assert synth_tokens(a, bs)[:full] == synth_tokens(b, bs)[:full]
    sample = load_workload(workload="mooncake-sample", limit=20)
    assert [len(synth_tokens(r, 512)) for r in sample.requests] == \
        [r.prompt_tokens for r in sample.requests]


def test_as_sent_gives_the_routers_hashes_with_the_same_sharing() -> None:
    """The sim compared with a stack run decides on the hashes the stack's router computes
    from the tokens it was sent (session keys session-less requests by them): the canonical
    hashes of the synthesized tokens, full blocks only, a one-to-one renaming of the trace's
    ids (so cache hits cannot change)."""
    from bench.prompts import as_sent, prepare
    from kvroute.blocks import hash_blocks
    from router_service.policies.base import RequestView
    from router_service.policies.session import session_key

    sample = load_workload(workload="mooncake-sample", limit=40)
    prompts = prepare(sample)
    sent = as_sent(sample, prompts)
    assert sent.requests != sample.requests and as_sent(sample) == sent
    renamed: dict[int, int] = {}
    for old, new, prompt in zip(sample.requests, sent.requests, prompts, strict=True):
        assert (new.request_id, new.arrival_s, new.prompt_tokens) == \
            (old.request_id, old.arrival_s, old.prompt_tokens)
        # what the router hashes from the tokens the stack sends: full blocks only
        assert list(new.block_hashes) == hash_blocks(prompt.tokens, 512)
        assert len(new.block_hashes) == new.prompt_tokens // 512
        for a, b in zip(old.block_hashes, new.block_hashes, strict=False):
            assert renamed.setdefault(a, b) == b  # one id, one hash
    assert len(set(renamed.values())) == len(renamed)  # and back
    first = sent.requests[0]
    view = RequestView(first.request_id, first.block_hashes, first.prompt_tokens, 512)
    old_view = RequestView(first.request_id, sample.requests[0].block_hashes,
                           first.prompt_tokens, 512)
    assert session_key(view, 4) != session_key(old_view, 4)  # the key the stack's router uses


def test_system_prompt_workload_shares_prefixes() -> None:
    spec = SystemPromptSpec(requests=200, system_prompts=3, system_tokens=256)
    wl = system_prompt(1, spec)
    heads = {r.block_hashes[:16] for r in wl.requests}
    assert len(heads) == 3
    assert len({r.block_hashes for r in wl.requests}) == 200
    with pytest.raises(ValueError, match="multiple of block_size"):
        system_prompt(1, SystemPromptSpec(system_tokens=250))
