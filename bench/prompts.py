"""Request payloads prepared before a stack replay starts its clock.

A replay through real processes must send every request at its (compressed) arrival time. On
the shipped sample that is 21 M prompt tokens in ~30 wall seconds; encoding them as JSON and
protobuf while replaying took a third of a core, and on a busy machine the driver fell seconds
behind the trace (measured as arrival lag). So every payload is encoded once, up front, and the
timed loop only does I/O: :class:`Prompt` holds a request's token ids, their JSON array text
and (for kvroute's Route RPC) the serialized request.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import msgspec
import numpy as np

from bench.workloads.base import TraceRequest, Workload
from kvroute.blocks import hash_blocks

JSON_HEADERS = {"Content-Type": "application/json"}
"""Headers of a pre-encoded JSON request body."""

_VOCAB = 32_000
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)


def synth_tokens(req: TraceRequest, block_size: int) -> list[int]:
    """Deterministic token ids for ``req``: block i's tokens depend only on its hash.

    Equal hashes give equal tokens and, because the hashes are prefix-chained, equal prefixes —
    so the sharing structure the trace records is exactly what the engines see. A prompt longer
    than its hashed blocks (a generated workload hashes full blocks only; the partial last block
    has no hash) gets its tail from the request id: it is ``prompt_tokens`` long, as the
    in-process replay counts it, and the tail is never cached there or here.
    """
    if not req.block_hashes:
        return list(range(1, req.prompt_tokens + 1))
    toks = _mix(np.array(req.block_hashes, dtype=np.uint64), block_size)
    out: list[int] = toks[:min(req.prompt_tokens, toks.size)].tolist()
    if len(out) < req.prompt_tokens:
        seed = int.from_bytes(hashlib.blake2b(req.request_id.encode(), digest_size=8).digest(),
                              "little")
        out += _mix(np.array([seed], dtype=np.uint64),
                    req.prompt_tokens - len(out)).tolist()
    return out


def _mix(hashes: np.ndarray, n: int) -> np.ndarray:
    """``n`` token ids per hash, each a function of the hash and its position only."""
    pos = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = hashes[:, None] * _M1 + (pos[None, :] + np.uint64(1)) * _M2
        x ^= x >> np.uint64(31)
        x *= _M2
        x ^= x >> np.uint64(29)
    out: np.ndarray = (x % np.uint64(_VOCAB - 1) + np.uint64(1)).ravel()
    return out


class Prompt:
    """One request's prompt: token ids and their JSON array, encoded once."""

    __slots__ = ("json", "tokens")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.json: bytes = msgspec.json.encode(tokens)
        """``[1,2,...]`` — spliced into request bodies by :func:`json_body`."""


def prepare(workload: Workload) -> list[Prompt]:
    """Every request's prompt of ``workload`` (synthesized tokens, JSON pre-encoded)."""
    return [Prompt(synth_tokens(r, workload.block_size)) for r in workload.requests]


def as_sent(workload: Workload, prompts: list[Prompt] | None = None) -> Workload:
    """``workload`` with each request's block hashes replaced by what the router computes from
    the tokens ``--mode stack`` sends: the canonical hashes (:func:`kvroute.blocks.hash_blocks`,
    unsalted, the workload's block size) of :func:`synth_tokens`, full blocks only.

    The sharing structure of full blocks is the same (equal hashes give equal tokens, and the
    canonical hash names the whole prefix); a partial last block, which engines never cache, is
    dropped, so it no longer takes space or hits in the sim. What changes besides is every
    figure that reads the hash values themselves: ``session`` keys a request without a session
    id by the hash of its leading blocks, and with the trace's small integer ids it put prefix
    groups on other nodes than the stack's router did. A sim compared with a stack run replays this.
    ``prompts``: :func:`prepare`'s output for ``workload``, when already made.
    """
    if prompts is None:
        prompts = prepare(workload)
    bs = workload.block_size
    reqs = [dataclasses.replace(r, block_hashes=tuple(hash_blocks(p.tokens, bs)))
            for r, p in zip(workload.requests, prompts, strict=True)]
    return dataclasses.replace(workload, requests=reqs)


def json_body(fields: Mapping[str, object], token_key: str, prompt: Prompt) -> bytes:
    """The JSON object ``{**fields, token_key: prompt.tokens}`` without re-encoding the tokens."""
    head = msgspec.json.encode(dict(fields))
    sep = b"," if len(head) > 2 else b""
    return b"".join((head[:-1], sep, msgspec.json.encode(token_key), b":", prompt.json, b"}"))
