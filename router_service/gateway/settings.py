"""Settings of ``kvroute serve gateway`` (flags and ``KVROUTE_*`` variables).

The gateway embeds the routing core, so it takes every router setting (registry address and
link mode, default policy, block size, limits; policy weights come from each policy's own
settings class) plus the HTTP front's own fields below.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.settings import require, setting
from router_service.gateway.pd import PROTOCOLS
from router_service.settings import RouterSettings


def parse_tokenizer_dirs(value: str) -> dict[str, str]:
    """``MODEL=DIR,MODEL2=DIR2`` -> {model: dir}; ValueError naming the bad item."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        model, sep, directory = item.partition("=")
        if not sep or not model.strip() or not directory.strip():
            raise ValueError(f"expected MODEL=DIR, got {item!r}")
        out[model.strip()] = directory.strip()
    return out


@dataclass(frozen=True)
class GatewaySettings(RouterSettings):
    """The OpenAI-compatible HTTP front: router settings plus the fields below."""

    listen: str = setting(
        "127.0.0.1:8000", "HTTP listen address HOST:PORT of the OpenAI-compatible API "
                          "(port 0 = a free port)")
    max_body_bytes: int = setting(
        16 * 1024 * 1024, "Largest request body accepted, in bytes (larger -> HTTP 413)")
    max_concurrent_requests: int = setting(
        1024, "Requests served at once; past it new requests get HTTP 429 with Retry-After")
    retry_after_s: int = setting(1, "Retry-After seconds sent with HTTP 429")
    retries: int = setting(
        1, "Attempts on another node after a connect error or a 5xx before the first byte "
           "(the failed node is marked suspect for the router)")
    connect_timeout_s: float = setting(
        2.0, "Deadline of connecting to an engine (a timeout counts as a connect error)")
    read_timeout_s: float = setting(
        600.0, "Longest wait for bytes from an engine: its response headers (queueing and "
               "prefill), each streamed chunk, a whole non-streamed answer; 0 = none")
    upstream_tls: bool = setting(
        False, "Talk to engines over HTTPS (verified with --client-tls-ca-file when set)")
    tokenizer_dirs: str = setting(
        "", "Local tokenizer files per model, MODEL=DIR[,MODEL=DIR...]: DIR holds the model's "
            "tokenizer.json and tokenizer_config.json/chat_template.jinja (what vLLM loads). "
            "Models without one are tokenized by asking one of their engines (POST /tokenize)")
    engine_tokenize: bool = setting(
        True, "Ask an engine's POST /tokenize for text prompts of models without "
              "--tokenizer-dirs (off: such prompts get HTTP 400; send token ids)")
    tokenize_cache_entries: int = setting(
        10_000, "Engine tokenizations remembered per request body (LRU; 0 = off)")
    models_refresh_s: float = setting(
        10.0, "How often the engines' GET /v1/models is read to learn loaded LoRA adapters")
    session_header: str = setting(
        "x-session-id", "Request header carrying a session id (session policy, affinity)")
    policy_header: str = setting(
        "x-kvroute-policy", "Request header naming a routing policy for this request")
    uvloop: bool = setting(True, "Run on uvloop when installed (faster event loop)")
    pd_protocol: str = setting(
        "vllm", "Disaggregated models (prefill-only and decode-only nodes): how the gateway hands "
        "a prompt's KV from the prefill to the decode node. vllm: prefill with "
        "kv_transfer_params.do_remote_decode and max_tokens 1, then decode with the prefill "
        "answer's kv_transfer_params (vLLM with a KV connector, e.g. NIXL); sglang: the same "
        "body with bootstrap_host/bootstrap_port/bootstrap_room to both nodes at once (SGLang "
        "--disaggregation-mode)")
    pd_bootstrap_port: int = setting(
        8998, "--pd-protocol sglang: the prefill nodes' bootstrap port (SGLang "
        "--disaggregation-bootstrap-port, default 8998); 0 = each prefill node's own HTTP port "
        "(engine_sim)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        require(self.max_concurrent_requests >= 1, "max_concurrent_requests", "must be >= 1")
        require(self.retry_after_s >= 0, "retry_after_s", "must be >= 0")
        require(0 <= self.retries <= 5, "retries", "must be in 0..5")
        require(self.connect_timeout_s > 0, "connect_timeout_s", "must be > 0")
        require(self.read_timeout_s >= 0, "read_timeout_s", "must be >= 0")
        require(self.tokenize_cache_entries >= 0, "tokenize_cache_entries", "must be >= 0")
        require(self.models_refresh_s > 0, "models_refresh_s", "must be > 0")
        require(bool(self.session_header), "session_header", "must not be empty")
        require(bool(self.policy_header), "policy_header", "must not be empty")
        require(self.pd_protocol in PROTOCOLS, "pd_protocol",
                f"must be one of {', '.join(PROTOCOLS)}")
        require(0 <= self.pd_bootstrap_port <= 65535, "pd_bootstrap_port",
                "must be a port number, or 0 for each prefill node's HTTP port")
        try:
            parse_tokenizer_dirs(self.tokenizer_dirs)
        except ValueError as exc:
            require(False, "tokenizer_dirs", str(exc))
