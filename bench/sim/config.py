"""Settings of the in-process fleet simulation (``kvroute bench --mode sim``)."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.settings import require, setting

DEFAULT_PREFILL_TOKENS_PER_S = 6_000.0
"""Default engine prefill speed: round_robin runs the shipped conversation trace on 8 nodes with
``--cache-blocks 5712`` at about 70 % prefill utilisation (measured; see bench/README.md)."""


@dataclass(frozen=True)
class SimSettings:
    """Engine model of every simulated node (the same for all nodes and all policies)."""

    nodes: int = setting(8, "number of simulated engines")
    cache_blocks: int = setting(
        0, "KV cache per engine in the workload's block units (0 = 25 % of the workload's "
           "distinct blocks spread over the nodes)")
    prefill_tokens_per_s: float = setting(
        DEFAULT_PREFILL_TOKENS_PER_S, "prefill speed of one engine: a prefill takes uncached "
                                      "prompt tokens / this many seconds (default latency model)")
    decode_s_per_token: float = setting(
        0.02, "decode time per output token of one request (default latency model)")
    max_batch: int = setting(64, "requests decoding at once per engine; more wait for a slot")
    latency_model: str = setting(
        "default", "default (prefill proportional to uncached tokens, queue per node, decode "
                   "per token with a batch limit) or seed (the notebook's constants: 50 ms "
                   "prefill for a full miss, 2 ms transfer, 100 ms decode)")
    heartbeat_delay_s: float = setting(
        0.0, "heartbeat lag: the registry's view of each cache lags the cache by this many "
             "seconds, and queue/usage reports refresh once per this interval (0 = live)")
    block_size: int = setting(0, "tokens per block (0 = the workload's)")

    def __post_init__(self) -> None:
        require(self.nodes >= 1, "nodes", "must be >= 1")
        require(self.cache_blocks >= 0, "cache_blocks", "must be >= 0")
        require(self.prefill_tokens_per_s > 0, "prefill_tokens_per_s", "must be > 0")
        require(self.decode_s_per_token >= 0, "decode_s_per_token", "must be >= 0")
        require(self.max_batch >= 1, "max_batch", "must be >= 1")
        require(self.latency_model in ("default", "seed"), "latency_model",
                "must be 'default' or 'seed'")
        require(self.heartbeat_delay_s >= 0, "heartbeat_delay_s", "must be >= 0")
