"""Generated token workloads, hashed with the canonical block hash (:mod:`kvroute.blocks`).

* ``conversations`` — the seed notebook's workload done right: C conversations x T turns; each
  turn's prompt is the whole conversation so far (earlier user messages and model answers) plus a
  new user message, so turn t+1 extends turn t's prompt. Conversations start at random times and
  interleave; the next turn arrives after the previous answer plus a think time.
* ``system-prompt`` — many independent requests that open with one of a few long shared system
  prompts (Zipf popularity) followed by a unique user message.

Token ids come from a seeded NumPy generator, so the same seed gives the same workload
everywhere. For the seed notebook's policy the "first 50 characters of the prompt" are the
decimal rendering of the first token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.workloads.base import TraceRequest, Workload, hash_ids_text
from kvroute.blocks import hash_blocks

VOCAB = 32_000
"""Token ids are drawn from 0..VOCAB-1."""


@dataclass(frozen=True)
class ConversationSpec:
    """Shape of the ``conversations`` workload."""

    conversations: int = 1000
    turns: int = 8
    block_size: int = 16
    user_tokens: tuple[int, int] = (200, 1200)
    output_tokens: tuple[int, int] = (100, 400)
    start_window_s: float = 600.0
    think_time_s: float = 20.0
    answer_s_per_token: float = 0.02


def conversations(seed: int = 0, spec: ConversationSpec | None = None) -> Workload:
    """C conversations x T turns, whole-history prompts, interleaved arrivals (module doc)."""
    s = spec or ConversationSpec()
    rng = np.random.default_rng(seed)
    reqs: list[TraceRequest] = []
    for c in range(s.conversations):
        history = np.empty(0, dtype=np.uint32)
        t = float(rng.uniform(0.0, s.start_window_s))
        for turn in range(s.turns):
            msg = rng.integers(0, VOCAB, int(rng.integers(*s.user_tokens)), dtype=np.uint32)
            prompt = np.concatenate([history, msg])
            out_n = int(rng.integers(*s.output_tokens))
            hashes = tuple(hash_blocks(prompt, s.block_size))
            reqs.append(TraceRequest(
                request_id=f"conv{c}-turn{turn}", arrival_s=t, block_hashes=hashes,
                prompt_tokens=int(prompt.size), output_tokens=out_n, session_key=f"conv{c}",
                prompt_text_head=hash_ids_text(prompt[:16].tolist())))
            answer = rng.integers(0, VOCAB, out_n, dtype=np.uint32)
            history = np.concatenate([prompt, answer])
            t += out_n * s.answer_s_per_token + float(rng.exponential(s.think_time_s))
    reqs.sort(key=lambda r: (r.arrival_s, r.request_id))
    return Workload("conversations", s.block_size, reqs,
                    source=f"generated: conversations seed={seed}",
                    meta={"generator": "conversations", "seed": seed, **s.__dict__})


@dataclass(frozen=True)
class SystemPromptSpec:
    """Shape of the ``system-prompt`` workload."""

    requests: int = 8000
    system_prompts: int = 64
    system_tokens: int = 2992
    zipf_s: float = 0.8
    block_size: int = 16
    user_tokens: tuple[int, int] = (50, 500)
    output_tokens: tuple[int, int] = (50, 300)
    rate_per_s: float = 16.0


def system_prompt(seed: int = 0, spec: SystemPromptSpec | None = None) -> Workload:
    """Independent requests behind a few shared system prompts (module doc)."""
    s = spec or SystemPromptSpec()
    if s.system_tokens % s.block_size:
        raise ValueError("system_tokens must be a multiple of block_size")
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, VOCAB, s.system_tokens, dtype=np.uint32)
               for _ in range(s.system_prompts)]
    sys_hashes = [hash_blocks(p, s.block_size) for p in systems]
    weights = 1.0 / np.arange(1, s.system_prompts + 1) ** s.zipf_s
    weights /= weights.sum()
    t = 0.0
    reqs: list[TraceRequest] = []
    for i in range(s.requests):
        t += float(rng.exponential(1.0 / s.rate_per_s))
        k = int(rng.choice(s.system_prompts, p=weights))
        msg = rng.integers(0, VOCAB, int(rng.integers(*s.user_tokens)), dtype=np.uint32)
        head = systems[k]
        # continue the chain from the system prompt's last full block (it is block-aligned)
        parent = sys_hashes[k][-1]
        tail = hash_blocks(msg, s.block_size, parent=parent)
        reqs.append(TraceRequest(
            request_id=f"sys{k}-req{i}", arrival_s=t, block_hashes=(*sys_hashes[k], *tail),
            prompt_tokens=int(head.size + msg.size),
            output_tokens=int(rng.integers(*s.output_tokens)),
            prompt_text_head=hash_ids_text(head[:16].tolist())))
    return Workload("system-prompt", s.block_size, reqs,
                    source=f"generated: system-prompt seed={seed}",
                    meta={"generator": "system-prompt", "seed": seed, **s.__dict__})
