"""The one parameter object of the simulated engine, with the one default of every parameter.

Every place that models an engine — ``kvroute serve engine-sim`` (:mod:`engine_sim.settings`),
the in-process fleet of ``kvroute bench --mode sim`` (:mod:`engine_sim.fleet`, ``bench.sim``), the
process fleets of ``--mode stack``, ``--peers`` and ``kvroute demo`` (``bench.stack_fleet``) —
takes its defaults from here, so an engine run in process and an engine run as a process are the
same engine unless a flag says otherwise.

The router's ``--kv-prefill-tokens-per-s`` is not an engine parameter: it is the router's *belief*
about its engines (router_service cannot import engine_sim), set by the operator from the real
engines; the bench passes it the engines' true rate unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFILL_TOKENS_PER_S = 6_000.0
"""Prefill speed of one engine (uncached prompt tokens per model second). Calibrated on the
shipped Mooncake conversation trace: round_robin on 8 engines with 5712 blocks of 512 tokens
runs at about 70-75 % prefill utilisation (bench/README.md): queueing matters, the fleet keeps
up."""

DEFAULT_DECODE_S_PER_TOKEN = 0.02
"""Decode time per output token after the first (model seconds)."""

DEFAULT_MAX_RUNNING = 64
"""Batch limit: requests admitted at once (prefilling or decoding); the rest queue FIFO."""

DEFAULT_CAPACITY_BLOCKS = 4096
"""KV cache capacity in blocks of a standalone engine (benches size it from the workload)."""

DEFAULT_BLOCK_SIZE = 16
"""Tokens per KV block (vLLM's default ``--block-size``)."""


@dataclass(frozen=True, slots=True)
class EngineParams:
    """Shape and speed of one simulated engine, in model time."""

    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    """A prefill takes uncached prompt tokens / this many seconds; prefills run one at a time."""
    decode_s_per_token: float = DEFAULT_DECODE_S_PER_TOKEN
    """Each output token after the first takes this long (decodes run in parallel)."""
    max_running: int = DEFAULT_MAX_RUNNING
    """Requests admitted at once; admission also needs the whole sequence to fit the cache."""
    capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS
    """KV cache slots (cached, held and anonymous blocks all take one)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per block."""

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be > 0")
        if self.decode_s_per_token < 0:
            raise ValueError("decode_s_per_token must be >= 0")
        if self.max_running < 1 or self.capacity_blocks < 1 or self.block_size < 1:
            raise ValueError("max_running, capacity_blocks and block_size must be >= 1")
