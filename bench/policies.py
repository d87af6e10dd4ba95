"""The policies ``kvroute bench`` compares, by name, built fresh for every replay.

Router policies (``kv_aware``, ``session``, ``round_robin``, ``least_loaded``, ``random``) come
from the router's own registry, so the bench runs the code the router serves. ``seed`` and the
peer re-implementations (``dynamo``, ``sglang``, ``llmd``) live in the bench only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.peer_policies.dynamo import DynamoPolicy
from bench.peer_policies.llmd import LlmdPolicy
from bench.peer_policies.sglang import SglangCacheAwarePolicy
from bench.seed_policy import SeedPolicy
from router_service.policies.base import Policy

ROUTER_POLICIES = ("kv_aware", "session", "round_robin", "least_loaded", "random")
"""Served by the router (built through ``router_service.policies.registry``)."""
BENCH_POLICIES = ("seed", "dynamo", "sglang", "llmd")
"""Bench-only: the seed notebook's algorithm and peer re-implementations."""
ALL_POLICIES = ROUTER_POLICIES + BENCH_POLICIES
"""Default ``--policies``, in table order."""


def _router_policy(name: str, prefill_tokens_per_s: float, seed: int,
                   overrides: dict[type[Any], Any]) -> Policy:
    from router_service.policies import registry
    from router_service.policies.kv_aware import KvAwareSettings

    settings: dict[type[Any], Any] = {
        KvAwareSettings: KvAwareSettings(kv_prefill_tokens_per_s=prefill_tokens_per_s)}
    try:
        from router_service.policies.random_choice import RandomSettings
        settings[RandomSettings] = RandomSettings(random_seed=seed)
    except ImportError:  # pragma: no cover - the router helper's module is missing
        pass
    settings.update(overrides)
    return registry.build_policy(name, settings)


def build_policy(name: str, *, prefill_tokens_per_s: float, seed: int = 0,
                 overrides: dict[type[Any], Any] | None = None) -> Policy:
    """A fresh policy called ``name``; ``overrides`` maps settings classes to instances.

    ``kv_aware`` gets ``kv_prefill_tokens_per_s`` = the simulated engines' prefill rate (what an
    operator sets from their engines' measured speed). Raises KeyError for unknown names.
    """
    bench: dict[str, Callable[[], Policy]] = {
        "seed": SeedPolicy,
        "dynamo": lambda: DynamoPolicy(seed=seed),
        "sglang": SglangCacheAwarePolicy,
        "llmd": lambda: LlmdPolicy(seed=seed),
    }
    if name in bench:
        return bench[name]()
    if name in ROUTER_POLICIES:
        return _router_policy(name, prefill_tokens_per_s, seed, overrides or {})
    raise KeyError(f"unknown policy {name!r}; known: {', '.join(ALL_POLICIES)}")
