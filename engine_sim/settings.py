"""Typed settings of ``kvroute serve engine-sim`` (flags, ``KVROUTE_*`` variables, defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine_sim.params import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CAPACITY_BLOCKS,
    DEFAULT_DECODE_S_PER_TOKEN,
    DEFAULT_MAX_RUNNING,
    DEFAULT_PREFILL_TOKENS_PER_S,
    EngineParams,
)
from kvroute.common_settings import ServerSettings
from kvroute.settings import parse_hostport, require, setting


@dataclass(frozen=True)
class EngineSimSettings(ServerSettings):
    """A simulated vLLM-like engine: KV cache, latency model, HTTP API and ZMQ KV events.

    ``listen`` (inherited) is the HTTP API address; engine_sim has no gRPC server.
    ``metrics_listen`` serves the same /metrics as the HTTP API, on a port of its own.
    """

    listen: str = setting(
        "127.0.0.1:0", "HTTP API listen address HOST:PORT (port 0 = a free port; engine_sim has "
        "no gRPC server)")
    tls_cert_file: str = setting("", "PEM certificate: serve the HTTP API over HTTPS")
    tls_ca_file: str = setting(
        "", "PEM CA bundle; when set, HTTPS clients must present a certificate signed by it")
    model: str = setting("sim-model", "Model name served (/v1/models, metric label model_name)")
    block_size: int = setting(DEFAULT_BLOCK_SIZE, "Tokens per KV block (vLLM --block-size)")
    capacity_blocks: int = setting(
        DEFAULT_CAPACITY_BLOCKS, "KV cache capacity in blocks (LRU eviction past it)")
    prefill_tokens_per_s: float = setting(
        DEFAULT_PREFILL_TOKENS_PER_S,
        "Prefill speed: uncached prompt tokens computed per second of model time (the default is "
        "the one every kvroute bench and demo engine uses; see engine_sim/params.py)")
    decode_ms_per_token: float = setting(
        DEFAULT_DECODE_S_PER_TOKEN * 1000.0,
        "Decode time per output token after the first, in model milliseconds")
    max_running: int = setting(
        DEFAULT_MAX_RUNNING,
        "Batch limit: requests admitted at once (prefilling or decoding); the rest queue FIFO")
    max_tokens_default: int = setting(
        16, "Output tokens of a request that gives no max_tokens")
    role: str = setting(
        "both", "Disaggregated prefill/decode role (reported in /server_info): prefill, decode "
        "or both. Any engine answers vLLM's kv_transfer_params: do_remote_decode returns the "
        "handover parameters, do_remote_prefill receives the KV instead of prefilling. With "
        "SGLang's bootstrap_room the role picks the half (a 'both' engine is the prefill when "
        "bootstrap_port is its own HTTP port)")
    bootstrap_timeout_s: float = setting(
        60.0, "SGLang-style disaggregation (bootstrap_room): wall seconds a decode request waits "
        "for its prefill on the prefill engine's bootstrap server (engine_sim's is its HTTP "
        "port) before answering 503")
    transfer_ms_per_block: float = setting(
        2.0 / 512 * 16, "Model milliseconds to receive one KV block from a prefill engine "
        "(default: the seed's 2 ms per 512 tokens at 16-token blocks)")
    time_scale: float = setting(
        1.0, "Wall seconds per model second (0.01 = replay 100x faster than real time)")
    events_endpoint: str = setting(
        "tcp://127.0.0.1:0",
        "ZMQ PUB endpoint of KV events (vLLM kv-events-config endpoint; port 0 = a free port; "
        "empty = no events)")
    replay_endpoint: str = setting(
        "tcp://127.0.0.1:0",
        "ZMQ ROUTER endpoint answering replay requests (port 0 = a free port; empty = none)")
    topic: str = setting("", "Topic frame of every KV event message (vLLM default: empty)")
    buffer_steps: int = setting(10000, "Event batches kept for replay (vLLM buffer_steps)")
    hwm: int = setting(100000, "ZMQ high-water mark of the PUB socket (vLLM hwm)")
    encoding: str = setting(
        "map", "Event encoding: map (vLLM >= 0.26, tagged maps with 'type') or positional "
        "(older vLLM, arrays with the tag first)")
    hash_type: str = setting(
        "int", "Block hashes on the wire: int (uint64, vLLM default) or bytes (32-byte digest, "
        "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0)")
    replay_form: str = setting(
        "topic", "Replay reply framing: topic ([topic, seq, payload], vLLM >= PR #45177) or "
        "legacy ([seq, payload])")
    data_parallel_rank: int = setting(
        0, "Data-parallel rank carried in every batch (third batch field)")
    seed: int = setting(
        -1, "Seed of the engine's block hashes (like PYTHONHASHSEED for vLLM's NONE_HASH); "
        "-1 = random per process, as vLLM does by default")
    max_prompt_tokens: int = setting(
        131072, "Longest prompt accepted, in tokens (longer prompts get HTTP 400)")
    engines: int = setting(
        1, "Engines served by this one process (a simulated fleet for benches), each with its "
        "own HTTP port, ZMQ event and replay sockets, metrics port and KV cache. Fixed ports "
        "count up from the one given (engine i: PORT+i), ipc:// paths get a .i suffix, port 0 "
        "stays a free port per engine")
    stats_records: int = setting(
        100000, "Per-request records kept for GET /kvroute/stats (oldest dropped first)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.block_size >= 1, "block_size", "must be >= 1")
        require(self.capacity_blocks >= 1, "capacity_blocks", "must be >= 1")
        require(self.prefill_tokens_per_s > 0, "prefill_tokens_per_s", "must be > 0")
        require(self.decode_ms_per_token >= 0, "decode_ms_per_token", "must be >= 0")
        require(self.max_running >= 1, "max_running", "must be >= 1")
        require(self.max_tokens_default >= 1, "max_tokens_default", "must be >= 1")
        require(self.role in ("both", "prefill", "decode"), "role",
                "must be prefill, decode or both")
        require(self.transfer_ms_per_block >= 0, "transfer_ms_per_block", "must be >= 0")
        require(self.bootstrap_timeout_s > 0, "bootstrap_timeout_s", "must be > 0")
        require(self.time_scale > 0, "time_scale", "must be > 0")
        require(self.encoding in ("map", "positional"), "encoding", "must be map or positional")
        require(self.hash_type in ("int", "bytes"), "hash_type", "must be int or bytes")
        require(self.replay_form in ("topic", "legacy"), "replay_form",
                "must be topic or legacy")
        require(self.buffer_steps >= 1, "buffer_steps", "must be >= 1")
        require(self.hwm >= 0, "hwm", "must be >= 0")
        require(self.data_parallel_rank >= 0, "data_parallel_rank", "must be >= 0")
        require(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        require(self.stats_records >= 0, "stats_records", "must be >= 0")
        require(1 <= self.engines <= 1024, "engines", "must be 1..1024")
        for name in ("events_endpoint", "replay_endpoint"):
            value = getattr(self, name)
            require(not value or value.startswith(("tcp://", "ipc://", "inproc://")), name,
                    "must be a ZMQ endpoint (tcp://HOST:PORT, ipc://PATH) or empty")

    def engine_params(self) -> EngineParams:
        """The engine model's parameters from these settings."""
        return EngineParams(prefill_tokens_per_s=self.prefill_tokens_per_s,
                            decode_s_per_token=self.decode_ms_per_token / 1000.0,
                            max_running=self.max_running, capacity_blocks=self.capacity_blocks,
                            block_size=self.block_size, role=self.role,
                            transfer_s_per_block=self.transfer_ms_per_block / 1000.0)

    def for_engine(self, i: int) -> EngineSimSettings:
        """The settings of engine ``i`` of a multi-engine process (itself when engines = 1)."""
        if self.engines == 1:
            return self
        return dataclasses.replace(
            self, engines=1, ready_file="", listen=_shift_hostport(self.listen, i),
            metrics_listen=_shift_hostport(self.metrics_listen, i),
            events_endpoint=_shift_endpoint(self.events_endpoint, i),
            replay_endpoint=_shift_endpoint(self.replay_endpoint, i))


def _shift_hostport(value: str, i: int) -> str:
    host, port = parse_hostport(value, "listen")
    return value if port == 0 else f"{host}:{port + i}"


def _shift_endpoint(endpoint: str, i: int) -> str:
    """Engine ``i``'s ZMQ endpoint: tcp port + i (0 stays 0), ipc path + ``.i``."""
    if not endpoint or endpoint.startswith("inproc://") or endpoint.startswith("ipc://"):
        return f"{endpoint}.{i}" if endpoint else endpoint
    head, _, port = endpoint.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return endpoint
    return f"{head}:{int(port) + i}"
