"""Canonical chained block hashing (DESIGN §2): the one function every component uses.

A prompt's token ids are split into blocks of ``block_size`` tokens; only full blocks are hashed.
The hash of block ``i`` is ``xxh3_64(parent_i || tokens_i)`` with a fixed seed, where
``parent_0`` is a root derived from the optional salt (model name, LoRA id) and ``parent_i`` is the
hash of block ``i - 1``. Block ``i``'s hash therefore names the whole token prefix up to block
``i``: two prompts share their first ``k`` hashes exactly when they share their first ``k`` full
blocks (and salt).

Tokens are encoded as little-endian uint32 and parents as little-endian uint64 before hashing.
Anything that changes these bytes changes :data:`HASH_SCHEME`, which nodes send at registration so
a mismatch is refused loudly instead of giving silent zero overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from xxhash import xxh3_64_intdigest

HASH_SCHEME = "xxh3_64-chain-v1"
"""Identity of the canonical hash function; part of RegisterNode so mismatches are caught."""

HASH_SEED = 0x6B76_726F_7574_6531  # "kvroute1"
"""Fixed xxh3 seed shared by every kvroute process."""

MAX_TOKEN_ID = 2**32 - 1
"""Largest token id the canonical encoding can carry (uint32)."""

_ROOT_TAG = b"kvroute/root/v1\x00"


def root_hash(salt: str | bytes = b"") -> int:
    """Parent hash of block 0 for the given salt (empty salt = the unsalted root)."""
    salt_bytes = salt.encode("utf-8") if isinstance(salt, str) else salt
    return xxh3_64_intdigest(_ROOT_TAG + salt_bytes, HASH_SEED)


def request_salt(lora_name: str | None = None, lora_id: int | None = None,
                 cache_salt: str | None = None) -> str:
    """The block-0 salt of a request: '' for base-model prompts, else its LoRA and cache salt.

    The router (from RouteRequest.lora_name / cache_salt) and the node agent (from the engine's
    BlockStored lora_name / lora_id / cache_salt) both derive the salt here, so adapter or salted
    prompts only ever match blocks cached under the same adapter and salt.
    """
    parts = []
    if lora_name:
        parts.append(f"lora={lora_name}")
    elif lora_id is not None:
        parts.append(f"lora_id={lora_id}")
    if cache_salt:
        parts.append(f"cache_salt={cache_salt}")
    return "\x1f".join(parts)


def _as_le_u32_bytes(token_ids: Sequence[int] | npt.NDArray[np.integer]) -> bytes:
    if isinstance(token_ids, np.ndarray):
        arr = token_ids
    else:
        arr = np.fromiter(token_ids, dtype=np.int64, count=len(token_ids))
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID):
        raise ValueError(f"token ids must be in 0..{MAX_TOKEN_ID}")
    return arr.astype("<u4", copy=False).tobytes()


def hash_blocks(
    token_ids: Sequence[int] | npt.NDArray[np.integer],
    block_size: int,
    *,
    salt: str | bytes = b"",
    parent: int | None = None,
) -> list[int]:
    """Canonical hashes of every full block of ``token_ids``.

    ``parent`` continues a chain: pass the hash of the block before ``token_ids[0]`` (as the
    node agent does for a run of blocks whose parent it already knows). Without it the chain
    starts at :func:`root_hash` of ``salt``. A trailing partial block is ignored.

    Raises ValueError for a block size below 1 or a token id outside 0..2**32-1.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n_blocks = len(token_ids) // block_size
    if n_blocks == 0:
        return []
    data = _as_le_u32_bytes(token_ids[: n_blocks * block_size])
    step = block_size * 4
    prev = root_hash(salt) if parent is None else parent
    out: list[int] = []
    append = out.append
    to_bytes = int.to_bytes
    for off in range(0, n_blocks * step, step):
        prev = xxh3_64_intdigest(to_bytes(prev, 8, "little") + data[off : off + step], HASH_SEED)
        append(prev)
    return out


def prefix_hash(token_ids: Sequence[int], block_size: int, salt: str | bytes = b"") -> int | None:
    """Hash of the last full block (names the whole prefix), or None below one block."""
    hashes = hash_blocks(token_ids, block_size, salt=salt)
    return hashes[-1] if hashes else None


@dataclass(frozen=True, slots=True)
class BlockHasher:
    """A hasher bound to one block size and salt (what a router or agent keeps)."""

    block_size: int
    """Tokens per block; must equal the registry's and the engine's block size."""
    salt: str = ""
    """Optional salt mixed into block 0 (model name, LoRA id); empty for none."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def __call__(self, token_ids: Sequence[int] | npt.NDArray[np.integer]) -> list[int]:
        """Canonical hashes of every full block of ``token_ids``."""
        return hash_blocks(token_ids, self.block_size, salt=self.salt)

    def continue_chain(self, parent: int, token_ids: Sequence[int]) -> list[int]:
        """Hashes of full blocks following a block whose hash is ``parent``."""
        return hash_blocks(token_ids, self.block_size, parent=parent)

    def full_blocks(self, num_tokens: int) -> int:
        """Number of full blocks in a prompt of ``num_tokens`` tokens."""
        return num_tokens // self.block_size
