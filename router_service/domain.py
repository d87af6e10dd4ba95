"""The routing core's request and decision, as plain types (no protobuf, no HTTP).

Every front end translates its own protocol into a :class:`RouteRequest`, calls
:meth:`router_service.core.RouterCore.decide` (or ``decide_local``), and translates the
:class:`RouteDecision` back: the gRPC Router API (:mod:`router_service.proto_adapter`), the
OpenAI-compatible gateway, the Envoy endpoint picker and ``kvroute bench --mode sim``. None of them
re-implements validation, hashing, placement lookup, the policy or load tracking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from router_service.policies.base import Candidate

TokenIds = Sequence[int] | npt.NDArray[np.integer]


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """One request to route. Give exactly one of ``token_ids``, ``prompt`` or ``block_hashes``."""

    request_id: str
    """Caller's id (1-256 characters); Complete releases the request by it."""
    model: str = ""
    """Model (empty = ``--default-model``, or the fleet's only model)."""
    token_ids: TokenIds | None = None
    """Prompt token ids, exactly as the engine will see them (preferred)."""
    prompt: str | None = None
    """Prompt text, tokenized with the router's ``--tokenizer`` (must match the engine's)."""
    block_hashes: Sequence[int] | None = None
    """Canonical block hashes, already computed with the registry's block size."""
    num_prompt_tokens: int = 0
    """With ``block_hashes``: prompt length in tokens (0 = blocks x block size)."""
    session_id: str | None = None
    """Conversation/session id (the ``session`` policy sticks it to a node)."""
    policy: str | None = None
    """Policy to apply (None = ``--default-policy``)."""
    lora_name: str | None = None
    """LoRA adapter the request runs under: salts block 0 exactly as the node agent does."""
    cache_salt: str | None = None
    """Per-request cache salt (vLLM/SGLang ``cache_salt``): salts block 0 the same way."""
    max_output_tokens: int = 0
    """Expected output tokens (0 = unknown)."""
    allowed: frozenset[str] | None = None
    """Subset hint: decide only among nodes whose id or address is in this set (None = all)."""
    excluded: frozenset[str] = frozenset()
    """Never these nodes (ids or addresses), e.g. the node a retry is moving away from."""
    deadline_s: float | None = None
    """Seconds the caller will wait for the request; its in-flight entry need not outlive it."""
    disaggregated: bool | None = None
    """Prefill/decode disaggregation: True = route a (prefill, decode) pair, False = one
    aggregated node, None = pair when the model has prefill-only and decode-only nodes."""
    decode_policy: str | None = None
    """Decode-node choice of a pair (None = ``--pd-decode-policy``; see
    :mod:`router_service.disagg`)."""


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The core's answer: where to send the request, and why."""

    request_id: str
    node_id: str
    """Chosen node."""
    address: str
    """The node's inference address (what to send the request to)."""
    policy: str
    """Policy that decided (``least_loaded`` when degraded)."""
    matched_blocks: int
    """Prefix blocks the registry believes the node caches on its device (GPU), counted as
    the engine reuses them (whole engine blocks, never the prompt's last token)."""
    expected_cached_tokens: int
    """Prompt tokens expected to be served from the node's device cache (GPU hits only)."""
    reason: str
    """Why, in words an operator can read."""
    degraded: bool
    """True when the registry was unreachable and the decision used the last known nodes."""
    prompt_tokens: int
    """Prompt length in tokens."""
    block_size: int
    """Tokens per block used for hashing."""
    candidates: tuple[Candidate, ...] = ()
    """Scores of the nodes considered, best first (policy-specific)."""
    fallback_addresses: tuple[str, ...] = field(default=())
    """Addresses of the next-best eligible nodes, best first (where to go if the chosen node
    refuses the connection)."""
    decode_node_id: str = ""
    """Disaggregated pair: the decode node (``node_id`` is then the prefill node); "" when
    aggregated."""
    decode_address: str = ""
    """The decode node's inference address."""
    decode_matched_blocks: int = 0
    """Prefix blocks of the request the decode node already holds (registry's belief)."""
    transfer_blocks: int = 0
    """KV blocks the decode node is expected to receive from the prefill node."""
    decode_reason: str = ""
    """Why this decode node."""
    decode_candidates: tuple[Candidate, ...] = ()
    """Scores of the decode nodes considered, best first."""
    offloaded_blocks: int = 0
    """Blocks after ``matched_blocks`` the node holds on an offloading medium (CPU, DISK),
    as the engine would reuse them (loaded back instead of recomputed)."""
    expected_offloaded_tokens: int = 0
    """``offloaded_blocks`` in tokens: not part of ``expected_cached_tokens``."""

    @property
    def disaggregated(self) -> bool:
        """True for a (prefill, decode) pair."""
        return bool(self.decode_node_id)

    @property
    def split(self) -> bool:
        """True for a pair whose halves run on two nodes. A ``both`` node can be given both
        halves; such a request is served whole, as an aggregated one."""
        return self.disaggregated and self.decode_node_id != self.node_id
