"""Policy names -> factories with typed settings; the router and the bench build policies here.

Every policy has a name (used in settings, requests, metrics and reasons), a one-line help and an
optional settings dataclass (fields made with :func:`kvroute.settings.setting`, so the CLI turns
them into documented flags and ``KVROUTE_*`` variables). :class:`PolicySet` holds one instance of
each policy for a router (stateful policies such as round robin keep their state there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router_service.policies.base import Policy
from router_service.policies.kv_aware import KvAwarePolicy, KvAwareSettings
from router_service.policies.least_loaded import LeastLoadedPolicy
from router_service.policies.random_choice import RandomPolicy, RandomSettings
from router_service.policies.round_robin import RoundRobinPolicy
from router_service.policies.session import SessionPolicy, SessionSettings


@dataclass(frozen=True)
class PolicySpec:
    """How to build one policy."""

    name: str
    """Policy name."""
    help: str
    """One line for --help and Stats."""
    settings_cls: type[Any] | None
    """Settings dataclass of the policy (None = no settings)."""
    factory: Callable[[Any], Policy]
    """Builds the policy from an instance of ``settings_cls`` (or None)."""


def _specs() -> dict[str, PolicySpec]:
    """Specs by name (built per call: cheap, and no module-level state)."""
    specs = [
        PolicySpec("round_robin", "healthy nodes in turn", None, lambda _s: RoundRobinPolicy()),
        PolicySpec("least_loaded", "fewest in-flight requests, then shortest queue", None,
                   lambda _s: LeastLoadedPolicy()),
        PolicySpec("session", "consistent hashing with bounded loads on the session id "
                              "(or a prompt-prefix key)", SessionSettings, SessionPolicy),
        PolicySpec("random", "uniformly random healthy node (baseline)", RandomSettings,
                   RandomPolicy),
        PolicySpec("kv_aware", "maximise saved prefill against load cost (TTFT estimate) "
                               "under a load cap", KvAwareSettings, KvAwarePolicy),
    ]
    return {s.name: s for s in specs}


def available() -> dict[str, PolicySpec]:
    """Every policy this build can apply, by name."""
    return _specs()


def settings_classes() -> list[type[Any]]:
    """The settings dataclasses of all policies (for flags)."""
    return [s.settings_cls for s in _specs().values() if s.settings_cls is not None]


def build_policy(name: str, settings: Mapping[type[Any], Any] | None = None) -> Policy:
    """One policy by name; ``settings`` maps a settings class to its instance (else defaults).

    Raises KeyError naming the known policies for an unknown name.
    """
    specs = _specs()
    spec = specs.get(name)
    if spec is None:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(specs))}")
    cfg = None
    if spec.settings_cls is not None:
        cfg = (settings or {}).get(spec.settings_cls) or spec.settings_cls()
    return spec.factory(cfg)


class PolicySet:
    """One instance of each available policy, by name."""

    def __init__(self, settings: Mapping[type[Any], Any] | None = None,
                 names: Sequence[str] | None = None) -> None:
        wanted = list(names) if names is not None else list(_specs())
        self._policies: dict[str, Policy] = {n: build_policy(n, settings) for n in wanted}

    @property
    def names(self) -> list[str]:
        """Policy names, sorted."""
        return sorted(self._policies)

    def get(self, name: str) -> Policy | None:
        """The policy called ``name``, or None."""
        return self._policies.get(name)
