"""The policies ``kvroute bench`` compares, by name, built fresh for every replay.

Router policies (``kv_aware``, ``session``, ``round_robin``, ``least_loaded``, ``random``) come
from the router's own factory (:func:`router_service.policies.factory.router_policies`), so the
bench runs the code the router serves; :func:`bench_factory` registers ``seed`` and the peer
re-implementations (``dynamo``, ``sglang``, ``llmd``) on a copy of that registry, and
``vllm_pd`` (vllm-router's PD-mode ``cache_aware`` prefill choice), which only the disaggregated
bench offers (``--pd-strategies vllm_pd/least_loaded``).
"""

from __future__ import annotations

from typing import Any

from bench.peer_policies.dynamo import DynamoPolicy
from bench.peer_policies.llmd import LlmdPolicy
from bench.peer_policies.sglang import SglangCacheAwarePolicy
from bench.peer_policies.vllm_pd import VllmPdCacheAwarePolicy
from bench.seed_policy import SeedPolicy
from router_service.policies.base import Policy
from router_service.policies.factory import PolicyFactory, PolicySpec, router_policies
from router_service.policies.kv_aware import KvAwareSettings
from router_service.policies.random_choice import RandomSettings

ROUTER_POLICIES = ("kv_aware", "session", "round_robin", "least_loaded", "random")
"""Served by the router, in table order (the same set as ``router_policies().names``)."""
BENCH_POLICIES = ("seed", "dynamo", "sglang", "llmd")
"""Bench-only: the seed notebook's algorithm and peer re-implementations."""
ALL_POLICIES = ROUTER_POLICIES + BENCH_POLICIES
"""Default ``--policies``, in table order."""
PD_ONLY_POLICIES = ("vllm_pd",)
"""Bench-only prefill choices of a peer's disaggregated mode: not aggregated policies (they
exist only as the prefill half of ``--pd-strategies``)."""
BUILDABLE_POLICIES = ALL_POLICIES + PD_ONLY_POLICIES
"""Every policy :func:`build_policy` makes (the prefill halves ``--pd-strategies`` accepts)."""


def bench_factory(seed: int = 0) -> PolicyFactory:
    """The router's policy factory plus the bench-only baselines."""
    factory = router_policies()
    factory.register(PolicySpec("seed", "the seed notebook's prompt-head hashing", None,
                                lambda _s: SeedPolicy()))
    factory.register(PolicySpec("dynamo", "re-implementation of Dynamo's KvRouter cost", None,
                                lambda _s: DynamoPolicy(seed=seed)))
    factory.register(PolicySpec("sglang", "re-implementation of sglang-router cache_aware", None,
                                lambda _s: SglangCacheAwarePolicy()))
    factory.register(PolicySpec("llmd", "re-implementation of llm-d's prefix scorer", None,
                                lambda _s: LlmdPolicy(seed=seed)))
    factory.register(PolicySpec("vllm_pd", "re-implementation of vllm-router's PD-mode "
                                "cache_aware prefill choice", None,
                                lambda _s: VllmPdCacheAwarePolicy()))
    return factory


def policy_settings(prefill_tokens_per_s: float, seed: int = 0,
                    overrides: dict[type[Any], Any] | None = None) -> dict[type[Any], Any]:
    """Settings the bench gives router policies: kv_aware's ``kv_prefill_tokens_per_s`` = the
    simulated engines' prefill rate (what an operator sets from their engines' measured speed),
    the random policy's seed, then ``overrides``."""
    out: dict[type[Any], Any] = {
        KvAwareSettings: KvAwareSettings(kv_prefill_tokens_per_s=prefill_tokens_per_s),
        RandomSettings: RandomSettings(random_seed=seed)}
    out.update(overrides or {})
    return out


def build_policy(name: str, *, prefill_tokens_per_s: float, seed: int = 0,
                 overrides: dict[type[Any], Any] | None = None) -> Policy:
    """A fresh policy called ``name`` (KeyError for unknown names)."""
    if name not in BUILDABLE_POLICIES:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(BUILDABLE_POLICIES)}")
    return bench_factory(seed).build(
        name, policy_settings(prefill_tokens_per_s, seed, overrides))
