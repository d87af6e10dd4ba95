"""Block-hashing throughput benchmark (``kvroute bench hashing``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from kvroute.blocks import hash_blocks


@dataclass(frozen=True)
class HashingResult:
    """Throughput of canonical block hashing on one core."""

    block_size: int
    prompt_tokens: int
    prompts: int
    tokens_per_s_list_input: float
    """From a Python list of ints (what a gRPC request's repeated field gives)."""
    tokens_per_s_array_input: float
    """From a NumPy uint32 array (the batched path)."""
    target_tokens_per_s: float

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready dict."""
        return asdict(self)


def run_hashing_bench(block_size: int = 16, prompt_tokens: int = 100_000, prompts: int = 20,
                      seed: int = 0, target: float = 20e6) -> HashingResult:
    """Hash ``prompts`` random prompts of ``prompt_tokens`` tokens; best of both input kinds."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 200_000, size=prompt_tokens, dtype=np.uint32)
              for _ in range(prompts)]
    lists = [a.tolist() for a in arrays]
    hash_blocks(lists[0], block_size)  # warm up
    t0 = time.perf_counter()
    for tokens in lists:
        hash_blocks(tokens, block_size)
    t_list = time.perf_counter() - t0
    t0 = time.perf_counter()
    for arr in arrays:
        hash_blocks(arr, block_size)
    t_arr = time.perf_counter() - t0
    total = prompts * prompt_tokens
    return HashingResult(block_size, prompt_tokens, prompts, total / t_list, total / t_arr, target)
