"""Settings of ``kvroute serve epp``: the router's settings plus the endpoint-picker protocol's.

The picker decides in-process with the same routing core as ``kvroute serve router``, so every
router flag (``--registry``, ``--tokenizer``, ``--block-size``, policies ...) applies unchanged;
the fields below are only about the ext_proc side.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.settings import require, setting
from router_service.settings import RouterSettings


@dataclass(frozen=True)
class EppSettings(RouterSettings):
    """Router settings plus the Envoy ext_proc / endpoint picker protocol settings."""

    fallback_endpoints: int = setting(
        0, "How many next-best endpoints to append to x-gateway-destination-endpoint after the "
           "chosen one (ip:port,ip:port,...). 0 = only the chosen endpoint, which is what an "
           "Envoy ORIGINAL_DST cluster can parse; gateways that use Envoy's override_host load "
           "balancer (Envoy Gateway, Istio, GKE) walk the list on retry")
    destination_namespace: str = setting(
        "envoy.lb", "Dynamic-metadata namespace the picked endpoint is written under, and the "
                    "filter-metadata namespace the served endpoint is read from")
    subset_namespace: str = setting(
        "envoy.lb.subset_hint", "Filter-metadata namespace of the data plane's subset hint "
                                "(x-gateway-destination-endpoint-subset)")
    max_body_bytes: int = setting(
        16 * 1024 * 1024, "Largest request body the picker accumulates (all ext_proc body "
                          "messages together); larger -> 413 immediate response")
    max_usage_scan_bytes: int = setting(
        64 * 1024 * 1024, "Response bytes scanned for usage.prompt_tokens_details.cached_tokens; "
                          "a longer response is still forwarded, only no longer scanned")
    max_inflight_requests: int = setting(
        0, "Load shedding: routed requests this picker has in flight (decided, response not "
           "finished) beyond which new ones are answered 429 instead of routed; 0 = no limit")
    session_header: str = setting(
        "x-session-id", "Request header whose value is the session id (session policy, "
                        "stickiness); empty = none")
    policy_header: str = setting(
        "x-kvroute-policy", "Request header that may name the routing policy of one request; "
                            "empty = clients cannot choose")
    expose_decision: bool = setting(
        True, "Add x-kvroute-node, x-kvroute-endpoint, x-kvroute-expected-cached-tokens and "
              "x-kvroute-served (the served endpoint the data plane reported) to the response "
              "(debugging, tests); disable to hide the fleet from clients")
    immediate_response_details: bool = setting(
        True, "Put the reason of a 4xx/5xx immediate response in its JSON body (OpenAI error "
              "shape); disable to answer with the status only")

    engine_tokenize: bool = setting(
        True, "Ask an engine's POST /tokenize for text prompts and chat messages, as the gateway "
              "does (off: only token-id prompts to /v1/completions are routed; others get 400)")
    tokenize_cache_entries: int = setting(
        10_000, "Engine tokenizations remembered per request body (LRU; 0 = off)")

    def __post_init__(self) -> None:
        RouterSettings.__post_init__(self)
        require(self.tokenize_cache_entries >= 0, "tokenize_cache_entries", "must be >= 0")
        require(0 <= self.fallback_endpoints <= 16, "fallback_endpoints", "must be in 0..16")
        require(bool(self.destination_namespace), "destination_namespace", "must not be empty")
        require(bool(self.subset_namespace), "subset_namespace", "must not be empty")
        require(1024 <= self.max_body_bytes <= 1 << 30, "max_body_bytes",
                "must be in 1024..1073741824")
        require(self.max_inflight_requests >= 0, "max_inflight_requests", "must be >= 0")
        require(self.max_usage_scan_bytes >= 0, "max_usage_scan_bytes", "must be >= 0")
