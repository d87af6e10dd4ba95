"""Settings of ``kvroute serve router`` (flags and ``KVROUTE_*`` variables).

Policy weights and caps live in each policy's own settings class (``--kv-*`` for kv_aware,
``--session-*`` for session, ...); see :func:`router_service.policies.factory.settings_classes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.common_settings import ClientTLSSettings, ServerSettings
from kvroute.settings import require, setting
from kvroute.targets import parse_targets

REGISTRY_MODES = ("mirror", "stream")
OLD_REGISTRY_MODES = {"replica": "mirror"}
"""Former mode names still accepted (``replica`` was the mirror's name before "replica" came to
mean a registry or router process only)."""


@dataclass(frozen=True)
class RouterSettings(ServerSettings, ClientTLSSettings):
    """Everything the router needs besides policy weights."""

    registry: str = setting(
        "", "Registry gRPC address HOST:PORT (required), or several replicas as a comma list "
            "HOST:PORT,HOST:PORT (the router follows one and moves to the next when it fails); "
            "a DNS name resolving to several addresses (headless Service) also fails over")
    registry_mode: str = setting(
        "mirror", "How the router learns placement: 'mirror' keeps a local mirror of the index "
                  "fed by Registry.WatchPlacement (no registry round trip per request); "
                  "'stream' asks over one persistent Registry.LookupStream ('replica' is "
                  "still read as 'mirror')")
    default_policy: str = setting(
        "kv_aware", "Policy used when a request names none (round_robin, least_loaded, "
                    "session, kv_aware, random)")
    default_model: str = setting(
        "", "Model assumed when a request names none (empty = the only model the fleet serves)")
    block_size: int = setting(
        16, "Tokens per KV block used to hash prompts; must equal the registry's block size "
            "(a mismatch fails routing with FAILED_PRECONDITION instead of zero overlap)")
    tokenizer: str = setting(
        "simple", "Tokenizer for prompts given as text: 'simple' (built-in, demos) or 'hf' "
                  "(HuggingFace tokenizer.json via --tokenizer-file)")
    tokenizer_file: str = setting("", "Path of a local tokenizer.json for --tokenizer hf")
    max_prompt_tokens: int = setting(
        262_144, "Largest prompt accepted, in tokens (token_ids, tokenized prompt, or "
                 "num_prompt_tokens); larger -> INVALID_ARGUMENT")
    max_prompt_chars: int = setting(
        2_000_000, "Largest prompt string accepted, in characters")
    max_token_id: int = setting(
        1_048_575, "Largest token id accepted (vocabulary size - 1); larger -> INVALID_ARGUMENT")
    inflight_timeout_s: float = setting(
        300.0, "A routed request with no Complete is released from the in-flight count after "
               "this many seconds (counted in kvroute_router_inflight_expired_total)")
    max_tracked_requests: int = setting(
        1_000_000, "Most in-flight requests tracked at once; the oldest are released beyond it")
    lookup_timeout_s: float = setting(
        0.25, "Deadline of one placement lookup on the registry stream (stream mode)")
    registry_timeout_s: float = setting(
        2.0, "Deadline of unary registry calls (ListNodes) and of connecting a stream")
    registry_retry_max_s: float = setting(
        0.5, "Longest back-off between reconnect attempts to the registry (jittered): a "
             "registry that comes back is followed again within about this long")
    node_cache_ttl_s: float = setting(
        2.0, "How long the node list from ListNodes is reused before asking again (stream mode)")
    max_candidates: int = setting(
        32, "Fleets with more nodes than this per model: kv_aware and least_loaded score only "
            "the half of this many nodes holding the longest prefix plus the half least loaded "
            "(by this router's in-flight count), so a decision's cost does not grow with the "
            "fleet; smaller fleets are scored whole. 0 = always score every node")
    mirror_max_staleness_s: float = setting(
        30.0, "Mirror mode: while the registry link is down the last index mirror keeps "
              "serving cache-aware decisions (blocks cached seconds ago mostly still are; "
              "the router's own in-flight counts carry the load); once it has been down this "
              "long the mirror is no longer trusted and decisions degrade to least_loaded "
              "(also read as --replica-max-staleness-s)",
        old_names=("replica_max_staleness_s",))

    max_concurrent_rpcs: int = setting(
        512, "Most calls the router serves at once (Route, Complete, Stats; a RouteStream "
              "counts once); beyond it a call is refused at once with RESOURCE_EXHAUSTED "
              "(retry with back-off, or on another router) instead of queueing past its "
              "deadline. 0 = unlimited")
    # -- issue 19: the shared view of load across router replicas ------------------------
    share_routes: bool = setting(
        False, "Share routing deltas with the other router/gateway replicas through the "
               "registry (RouteShare.Exchange): every replica then counts every replica's "
               "in-flight requests, queued prefill and recent routes. Turn on when running "
               "more than one replica")
    router_replica_id: str = setting(
        "", "This replica's id in the shared view (empty = hostname:pid)")
    share_timeout_s: float = setting(
        5.0, "With --share-routes: a replica that hears nothing from the registry's hub "
             "(it sends keepalives every second) for this long decides on its own counts")
    share_max_blocks: int = setting(
        64, "With --share-routes: leading block hashes of each routed request shared for "
            "kv_aware's recently-routed overlap")
    share_burst_window_s: float = setting(
        0.01, "With --share-routes: a replica that routed another request within this many "
              "seconds is in a burst (the other replicas' decisions of the same moment are not "
              "in its view yet) and kv_aware takes its own slot of the replicas' plan "
              "(--kv-replica-spread); about twice the shared view's worst staleness")
    share_burst_coincidence: float = setting(
        0.5, "With --share-routes: every decision counts as in a burst while at least this "
             "share of the other replicas' recent decisions (about the last 20) were made "
             "within --share-burst-window-s of one of this replica's (traffic arriving in "
             "bursts that reach every replica at once; a burst's first request cannot be told "
             "from a lone one otherwise); above 1 = only back-to-back own decisions count")
    share_burst_stagger_s: float = setting(
        0.0, "With --share-routes: in a burst, the replica ranked r among the live replicas "
             "waits r x this many seconds before deciding, so it decides with the lower-ranked "
             "replicas' decisions of the same instant in view, instead of taking a slot of one "
             "plan. Set it above the shared view's worst staleness "
             "(kvroute_router_shared_view_staleness_seconds); it adds up to (replicas - 1) x "
             "this to burst decisions; below --share-burst-window-s, which should span the "
             "turns, (replicas - 1) x this, or the last ranks' decisions stop counting as a "
             "burst (and widening the window makes more spread-out traffic a burst). 0 = off")

    def __post_init__(self) -> None:
        ServerSettings.__post_init__(self)
        require(bool(self.registry), "registry", "the registry address HOST:PORT is required")
        parse_targets(self.registry, "registry")
        if self.registry_mode in OLD_REGISTRY_MODES:
            object.__setattr__(self, "registry_mode", OLD_REGISTRY_MODES[self.registry_mode])
        require(self.registry_mode in REGISTRY_MODES, "registry_mode",
                f"must be one of {', '.join(REGISTRY_MODES)}")
        require(self.block_size >= 1, "block_size", "must be >= 1")
        require(self.tokenizer in ("simple", "hf"), "tokenizer", "must be simple or hf")
        require(self.tokenizer != "hf" or bool(self.tokenizer_file), "tokenizer_file",
                "required with --tokenizer hf")
        require(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        require(self.max_prompt_chars >= 1, "max_prompt_chars", "must be >= 1")
        require(0 <= self.max_token_id <= 2**32 - 1, "max_token_id", "must be in 0..2**32-1")
        require(self.inflight_timeout_s > 0, "inflight_timeout_s", "must be > 0")
        require(self.max_tracked_requests >= 1, "max_tracked_requests", "must be >= 1")
        require(self.max_concurrent_rpcs >= 0, "max_concurrent_rpcs", "must be >= 0")
        require(self.max_candidates == 0 or self.max_candidates >= 4, "max_candidates",
                "must be 0 (off) or >= 4")
        require(0 <= self.share_max_blocks <= 256, "share_max_blocks", "must be in 0..256")
        require(self.share_burst_window_s >= 0, "share_burst_window_s", "must be >= 0")
        require(self.share_burst_coincidence >= 0, "share_burst_coincidence", "must be >= 0")
        require(0 <= self.share_burst_stagger_s <= 1, "share_burst_stagger_s", "must be in 0..1")
        require(self.share_burst_stagger_s < self.share_burst_window_s
                or not self.share_burst_stagger_s, "share_burst_stagger_s",
                "must be below --share-burst-window-s (turns farther apart than the window no "
                "longer look like replicas deciding side by side)")
        require(len(self.router_replica_id) <= 256, "router_replica_id",
                "must be at most 256 characters")
        for name in ("lookup_timeout_s", "registry_timeout_s", "registry_retry_max_s",
                     "node_cache_ttl_s", "mirror_max_staleness_s", "share_timeout_s"):
            require(getattr(self, name) > 0, name, "must be > 0")
