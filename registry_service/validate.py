"""Input checks of every Registry RPC: each failure names the field and the limit."""

from __future__ import annotations

import math
import re

from kvroute.blocks import HASH_SCHEME
from kvroute.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from kvroute.v1 import registry_pb2 as pb
from registry_service.settings import RegistrySettings

NODE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_ADDRESS = 512
MAX_MODEL = 256
MAX_LABELS = 64
MAX_LABEL_LEN = 256
MAX_CAPACITY = 1 << 40
MAX_ENGINE_BLOCK = 1 << 16
MAX_NOTE = 512
MAX_PREFILL_RATE = 1e9


def node_id(value: str) -> str:
    """A valid node id or INVALID_ARGUMENT."""
    if not NODE_ID_RE.match(value):
        raise InvalidArgument(
            f"node_id {value[:64]!r} is invalid: use 1-128 characters of [A-Za-z0-9._:-]")
    return value


def hash_count(n: int, field: str, s: RegistrySettings) -> None:
    """RESOURCE_EXHAUSTED when one call carries more hashes than allowed."""
    if n > s.max_hashes_per_call:
        raise ResourceExhausted(
            f"{field}: {n} block hashes in one call, the limit is {s.max_hashes_per_call} "
            f"(--max-hashes-per-call); split it over several calls")


def register(req: pb.RegisterNodeRequest, s: RegistrySettings) -> None:
    """Check a RegisterNodeRequest."""
    node_id(req.node_id)
    if not req.address or len(req.address) > MAX_ADDRESS or req.address.strip() != req.address:
        raise InvalidArgument(
            f"address must be 1-{MAX_ADDRESS} characters (host:port or URL) without spaces")
    if not req.model or len(req.model) > MAX_MODEL:
        raise InvalidArgument(f"model must be 1-{MAX_MODEL} characters")
    if req.block_size == 0:
        raise InvalidArgument(
            f"block_size is required (the registry uses {s.block_size} tokens per block)")
    if req.block_size != s.block_size:
        raise FailedPrecondition(
            f"block size mismatch: node {req.node_id} hashes {req.block_size}-token blocks, "
            f"this registry uses {s.block_size}-token blocks (--block-size); configure both "
            f"the same or lookups would silently find no overlap")
    if req.hash_scheme and req.hash_scheme != HASH_SCHEME:
        raise FailedPrecondition(
            f"hash scheme mismatch: node {req.node_id} uses {req.hash_scheme!r}, this registry "
            f"uses {HASH_SCHEME!r}; upgrade the older side")
    if req.capacity_blocks == 0 or req.capacity_blocks > MAX_CAPACITY:
        raise InvalidArgument(f"capacity_blocks must be 1..{MAX_CAPACITY}, got "
                              f"{req.capacity_blocks}")
    if req.role not in ("", "both", "prefill", "decode"):
        raise InvalidArgument(f"role must be prefill, decode or both (or empty = both), got "
                              f"{req.role[:32]!r}")
    if len(req.labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels, got {len(req.labels)}")
    for k, v in req.labels.items():
        if not k or len(k) > MAX_LABEL_LEN or len(v) > MAX_LABEL_LEN:
            raise InvalidArgument(
                f"label {k[:32]!r}: keys must be 1-{MAX_LABEL_LEN} and values at most "
                f"{MAX_LABEL_LEN} characters")


def has_delta(req: pb.HeartbeatRequest) -> bool:
    """True when the heartbeat carries block changes (of any tier) to apply."""
    return bool(req.stored or req.removed or req.cleared or req.stored_offloaded
                or req.removed_offloaded)


def heartbeat(req: pb.HeartbeatRequest, s: RegistrySettings) -> None:
    """Check a HeartbeatRequest (node existence and epoch are checked by the core)."""
    node_id(req.node_id)
    if req.epoch == 0:
        raise InvalidArgument("epoch is required: use the epoch RegisterNode returned")
    hash_count(len(req.stored) + len(req.removed), "stored+removed", s)
    hash_count(len(req.stored_offloaded) + len(req.removed_offloaded),
               "stored_offloaded+removed_offloaded", s)
    if has_delta(req) and req.delta_seq == 0:
        raise InvalidArgument(
            "delta_seq must be >= 1 when stored, removed, stored_offloaded, removed_offloaded "
            "or cleared is set (1 after each RegisterNode or Resync, +1 per heartbeat carrying "
            "changes)")
    if req.capacity_blocks > MAX_CAPACITY:
        raise InvalidArgument(f"capacity_blocks must be at most {MAX_CAPACITY}")
    if req.engine_block_size > MAX_ENGINE_BLOCK:
        raise InvalidArgument(f"engine_block_size must be at most {MAX_ENGINE_BLOCK}")
    if req.engine_lookahead_tokens > MAX_ENGINE_BLOCK:
        raise InvalidArgument(f"engine_lookahead_tokens must be at most {MAX_ENGINE_BLOCK}")
    if int(req.index_state) not in pb.IndexState.values():
        raise InvalidArgument(f"index_state {int(req.index_state)} is not an IndexState value")
    if len(req.index_note) > MAX_NOTE:
        raise InvalidArgument(f"index_note must be at most {MAX_NOTE} characters")
    rate = req.prefill_tokens_per_s
    if not (math.isfinite(rate) and 0.0 <= rate <= MAX_PREFILL_RATE):
        raise InvalidArgument(f"prefill_tokens_per_s must be a finite number in 0.."
                              f"{MAX_PREFILL_RATE:g} (0 = not measured); got {rate}")


def lookup(req: pb.LookupRequest, s: RegistrySettings) -> None:
    """Check a LookupRequest."""
    hash_count(len(req.block_hashes), "block_hashes", s)
    if len(req.model) > MAX_MODEL:
        raise InvalidArgument(f"model must be at most {MAX_MODEL} characters")
