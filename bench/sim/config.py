"""Settings of the in-process fleet simulation (``kvroute bench --mode sim``)."""

from __future__ import annotations

from dataclasses import dataclass

from engine_sim.params import (
    DEFAULT_DECODE_S_PER_TOKEN,
    DEFAULT_MAX_RUNNING,
    DEFAULT_PREFILL_TOKENS_PER_S,
    EngineParams,
)
from kvroute.settings import require, setting


@dataclass(frozen=True)
class SimSettings:
    """Engine model of every simulated node (the same for all nodes and all policies)."""

    nodes: int = setting(8, "number of simulated engines")
    cache_blocks: int = setting(
        0, "KV cache per engine in the workload's block units (0 = 25 % of the workload's "
           "distinct blocks spread over the nodes)")
    prefill_tokens_per_s: float = setting(
        DEFAULT_PREFILL_TOKENS_PER_S,
        "prefill speed of one engine: a prefill takes uncached prompt tokens / this many "
        "seconds (default latency model; the same default as kvroute serve engine-sim)")
    decode_s_per_token: float = setting(
        DEFAULT_DECODE_S_PER_TOKEN,
        "decode time per output token of one request (default latency model)")
    max_batch: int = setting(
        DEFAULT_MAX_RUNNING,
        "requests admitted at once per engine (engine_sim --max-running); more wait in FIFO")
    latency_model: str = setting(
        "default", "default: engine_sim's engine model (prefill proportional to uncached tokens "
                   "on one prefill unit, admission when the sequence fits, decode per token "
                   "with a batch limit) -- the only model, as in --mode stack")
    heartbeat_delay_s: float = setting(
        0.0, "heartbeat lag: the registry's view of each cache lags the cache by this many "
             "seconds, and queue/usage reports refresh once per this interval (0 = live)")
    block_size: int = setting(0, "tokens per block (0 = the workload's)")
    complete_lag_s: float = setting(
        0.0, "--mode sim: model seconds between an engine finishing a request and the router "
             "(and a peer's own state) hearing of it -- in --mode stack the response's trip "
             "back and the Complete call (the stack table prints it as 'return lag'); "
             "0 = at once")
    arrival_jitter_s: float = setting(
        0.0, "--mode sim: each request reaches the router and its engine up to this many model "
             "seconds after its scheduled arrival (uniform, seeded by --seed; with --repeat N "
             "run k uses --seed + k) -- the client and network lag --mode stack has (its table "
             "prints it as 'arrival lag'); 0 = exactly on schedule")
    mixed_batch_slowdown: float = setting(
        0.0, "what-if of prefill/decode interference: each request decoding on an engine when "
             "a prefill starts there lengthens that prefill by this fraction (0 = off, the "
             "model every README figure uses; only engines that prefill and decode feel it)")

    def __post_init__(self) -> None:
        require(self.nodes >= 1, "nodes", "must be >= 1")
        require(self.cache_blocks >= 0, "cache_blocks", "must be >= 0")
        require(self.prefill_tokens_per_s > 0, "prefill_tokens_per_s", "must be > 0")
        require(self.decode_s_per_token >= 0, "decode_s_per_token", "must be >= 0")
        require(self.max_batch >= 1, "max_batch", "must be >= 1")
        require(self.latency_model == "default", "latency_model",
                "must be 'default' (the seed notebook's constant preset was retired when "
                "--mode sim moved onto engine_sim's engine model: one engine model)")
        require(self.heartbeat_delay_s >= 0, "heartbeat_delay_s", "must be >= 0")
        require(self.complete_lag_s >= 0, "complete_lag_s", "must be >= 0")
        require(self.arrival_jitter_s >= 0, "arrival_jitter_s", "must be >= 0")
        require(self.mixed_batch_slowdown >= 0, "mixed_batch_slowdown", "must be >= 0")

    def engine_params(self, cache_blocks: int, block_size: int) -> EngineParams:
        """The engines' parameters for a run with this cache size and block size (resolved from
        the workload when ``cache_blocks``/``block_size`` are 0)."""
        return EngineParams(prefill_tokens_per_s=self.prefill_tokens_per_s,
                            decode_s_per_token=self.decode_s_per_token,
                            max_running=self.max_batch, capacity_blocks=cache_blocks,
                            block_size=block_size,
                            mixed_batch_slowdown=self.mixed_batch_slowdown)
