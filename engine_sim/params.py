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

ROLES = ("both", "prefill", "decode")
"""``both``: an aggregated engine; ``prefill``: computes prompts and hands their KV over;
``decode``: receives prompts' KV from a prefill engine and generates."""

TRANSFER_PRESETS = {"seed": 0.002, "rdma-8b": 0.0055, "tcp-8b": 0.055}
"""Seconds to move 512 tokens' KV between engines (a Mooncake-trace block; scale by block size /
512 for other block sizes, :func:`transfer_s_per_block`): ``seed``: the seed notebook's 2 ms per
transfer, read as per 512-token block; ``rdma-8b``: an 8B GQA model's 64 MiB per 512 tokens over
100 Gb/s RDMA at ~12 GB/s; ``tcp-8b``: the same over ~1.2 GB/s (10 Gb/s TCP)."""


def transfer_s_per_block(preset_or_seconds: str, block_size: int) -> float:
    """Seconds per ``block_size``-token block: a :data:`TRANSFER_PRESETS` name (scaled from 512
    tokens) or a number of seconds per block. ValueError otherwise."""
    if preset_or_seconds in TRANSFER_PRESETS:
        return TRANSFER_PRESETS[preset_or_seconds] * block_size / 512
    value = float(preset_or_seconds)
    if not value >= 0:  # negative or NaN
        raise ValueError("transfer seconds per block must be >= 0")
    return value


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
    role: str = "both"
    """Disaggregation role (:data:`ROLES`); a ``decode`` engine takes a request whose KV was
    prefilled elsewhere (``SimRequest.remote_kv``) by receiving the blocks it lacks."""
    transfer_s_per_block: float = TRANSFER_PRESETS["seed"] * DEFAULT_BLOCK_SIZE / 512
    """Seconds to receive one KV block from a prefill engine (transfer cost is proportional
    to the blocks moved; transfers of different requests overlap)."""
    mixed_batch_slowdown: float = 0.0
    """Prefill/decode interference in a mixed batch: each request *decoding* on the engine
    when a prefill starts lengthens that prefill by this fraction (0.02 with 30 decoding
    requests: 1.6x). 0 (the default) = decode steps never slow a prefill. Only engines that
    both prefill and decode feel it: a prefill-only engine has no decoding requests and a
    decode-only one no prefill (the interference disaggregation removes)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if self.transfer_s_per_block < 0:
            raise ValueError("transfer_s_per_block must be >= 0")
        if not self.mixed_batch_slowdown >= 0:
            raise ValueError("mixed_batch_slowdown must be >= 0")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be > 0")
        if self.decode_s_per_token < 0:
            raise ValueError("decode_s_per_token must be >= 0")
        if self.max_running < 1 or self.capacity_blocks < 1 or self.block_size < 1:
            raise ValueError("max_running, capacity_blocks and block_size must be >= 1")
