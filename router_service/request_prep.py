"""Validate a :class:`RouteRequest` and reduce it to what policies see: canonical block hashes.

Raises :mod:`kvroute.errors` types whose message names the field and the limit. Token ids are
converted to a NumPy array once (iterating a long Python sequence costs ~100 us), then hashed
with :func:`kvroute.blocks.hash_blocks` — the same function the node agent applies to the
engine's events, with the same LoRA / cache-salt salt in block 0.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kvroute.blocks import hash_blocks, request_salt
from kvroute.errors import InvalidArgument
from router_service.domain import RouteRequest
from router_service.policies.base import RequestView
from router_service.settings import RouterSettings
from router_service.tokenizer import Tokenizer

MAX_ID_CHARS = 256
"""Longest request, session, model or node id accepted."""


def check_id(value: str, field: str, required: bool = True) -> None:
    """INVALID_ARGUMENT unless ``value`` is a non-empty (when required) id of <= 256 chars."""
    if (required and not value) or len(value) > MAX_ID_CHARS:
        need = f"1-{MAX_ID_CHARS}" if required else f"at most {MAX_ID_CHARS}"
        raise InvalidArgument(f"{field}: required, {need} characters (got {len(value)})"
                              if required else
                              f"{field}: {need} characters (got {len(value)})")


def request_view(req: RouteRequest, s: RouterSettings, tokenizer: Tokenizer,
                 registry_block_size: int) -> RequestView:
    """The policy's view of ``req``: ids checked, prompt hashed into canonical blocks."""
    check_id(req.request_id, "request_id")
    session = req.session_id or None
    if session is not None:
        check_id(session, "session_id", required=False)
    bs = s.block_size
    tokens: npt.NDArray[np.integer]
    if req.token_ids is not None and len(req.token_ids):
        try:
            tokens = np.asarray(req.token_ids, dtype=np.int64)
        except (OverflowError, ValueError, TypeError):
            raise InvalidArgument(f"token_ids: every id must be an integer in "
                                  f"0..{s.max_token_id} (--max-token-id)") from None
        _check_tokens(tokens, "token_ids", s)
    elif req.prompt:
        if len(req.prompt) > s.max_prompt_chars:
            raise InvalidArgument(f"prompt: {len(req.prompt)} characters is over the limit "
                                  f"of {s.max_prompt_chars} (--max-prompt-chars)")
        tokens = np.array(tokenizer.encode(req.prompt), dtype=np.int64)
        _check_tokens(tokens, "prompt", s)
    elif req.block_hashes is not None and (len(req.block_hashes) or req.num_prompt_tokens):
        # (no blocks but a length: a prompt shorter than one block)
        bs = registry_block_size or bs  # the caller hashed with the registry's block size
        n_blocks = len(req.block_hashes)
        prompt_tokens = req.num_prompt_tokens or n_blocks * bs
        if prompt_tokens > s.max_prompt_tokens:
            raise InvalidArgument(f"num_prompt_tokens: {prompt_tokens} tokens is over the "
                                  f"limit of {s.max_prompt_tokens} (--max-prompt-tokens)")
        if prompt_tokens <= (n_blocks - 1) * bs:
            raise InvalidArgument(f"num_prompt_tokens: {prompt_tokens} is too small for "
                                  f"{n_blocks} block_hashes of {bs} tokens (the last block may "
                                  f"be partial, the others are full)")
        return RequestView(req.request_id, req.block_hashes, prompt_tokens, bs, session,
                           req.max_output_tokens)
    else:
        raise InvalidArgument("token_ids: give token_ids (preferred), prompt or "
                              "block_hashes; all were empty")
    salt = request_salt(req.lora_name or None, None, req.cache_salt or None)
    blocks = hash_blocks(tokens, bs, salt=salt) if len(tokens) >= bs else []
    return RequestView(req.request_id, blocks, len(tokens), bs, session, req.max_output_tokens)


def _check_tokens(tokens: npt.NDArray[np.integer], field: str, s: RouterSettings) -> None:
    if len(tokens) > s.max_prompt_tokens:
        raise InvalidArgument(f"{field}: {len(tokens)} tokens is over the limit of "
                              f"{s.max_prompt_tokens} (--max-prompt-tokens)")
    if not len(tokens):
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi > s.max_token_id:
        bad = int(np.argmax((tokens < 0) | (tokens > s.max_token_id)))
        raise InvalidArgument(f"{field}: token id {int(tokens[bad])} at position {bad} is "
                              f"out of range 0..{s.max_token_id} (--max-token-id)")
