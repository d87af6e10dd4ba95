"""The one policy factory: policy names -> builders with typed settings.

Every policy has a name (used in settings, requests, metrics and reasons), a one-line help and an
optional settings dataclass (fields made with :func:`kvroute.settings.setting`, so the CLI turns
them into documented flags and ``KVROUTE_*`` variables). :func:`router_policies` is the factory
of the policies the router serves; the bench starts from the same factory and registers its
bench-only baselines on its own copy (no module-level state). :class:`PolicySet` holds one
instance of each policy for a router (stateful policies such as round robin keep their state
there).
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


class PolicyFactory:
    """Builds policies by name from their specs; one per caller (no global state)."""

    def __init__(self, specs: Sequence[PolicySpec] = ()) -> None:
        self._specs: dict[str, PolicySpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: PolicySpec) -> None:
        """Add a policy; a name can be registered once."""
        if spec.name in self._specs:
            raise ValueError(f"policy {spec.name!r} is already registered")
        self._specs[spec.name] = spec

    @property
    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._specs)

    def specs(self) -> dict[str, PolicySpec]:
        """Specs by name (a copy)."""
        return dict(self._specs)

    def settings_classes(self) -> list[type[Any]]:
        """The settings dataclasses of all policies (for flags)."""
        return [s.settings_cls for s in self._specs.values() if s.settings_cls is not None]

    def build(self, name: str, settings: Mapping[type[Any], Any] | None = None) -> Policy:
        """One policy by name; ``settings`` maps a settings class to its instance (else
        defaults). Raises KeyError naming the known policies for an unknown name."""
        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(self._specs))}")
        cfg = None
        if spec.settings_cls is not None:
            cfg = (settings or {}).get(spec.settings_cls) or spec.settings_cls()
        return spec.factory(cfg)


def router_policies() -> PolicyFactory:
    """The policies the router serves."""
    return PolicyFactory([
        PolicySpec("round_robin", "healthy nodes in turn", None, lambda _s: RoundRobinPolicy()),
        PolicySpec("least_loaded", "fewest in-flight requests, then shortest queue", None,
                   lambda _s: LeastLoadedPolicy()),
        PolicySpec("session", "consistent hashing with bounded loads on the session id "
                              "(or a prompt-prefix key)", SessionSettings, SessionPolicy),
        PolicySpec("random", "uniformly random healthy node (baseline)", RandomSettings,
                   RandomPolicy),
        PolicySpec("kv_aware", "maximise saved prefill against load cost (TTFT estimate) "
                               "under a load cap", KvAwareSettings, KvAwarePolicy),
    ])


def available() -> dict[str, PolicySpec]:
    """Every policy the router can apply, by name."""
    return router_policies().specs()


def settings_classes() -> list[type[Any]]:
    """The settings dataclasses of the router's policies (for flags)."""
    return router_policies().settings_classes()


def build_policy(name: str, settings: Mapping[type[Any], Any] | None = None) -> Policy:
    """One of the router's policies by name (see :meth:`PolicyFactory.build`)."""
    return router_policies().build(name, settings)


class PolicySet:
    """One instance of each wanted policy, by name."""

    def __init__(self, settings: Mapping[type[Any], Any] | None = None,
                 names: Sequence[str] | None = None,
                 factory: PolicyFactory | None = None) -> None:
        reg = factory or router_policies()
        wanted = list(names) if names is not None else reg.names
        self._policies: dict[str, Policy] = {n: reg.build(n, settings) for n in wanted}

    @classmethod
    def of(cls, *policies: Policy) -> PolicySet:
        """A set of already built policies (the bench builds each replay's policy fresh)."""
        out = cls(names=[])
        out._policies = {p.name: p for p in policies}
        return out

    @property
    def names(self) -> list[str]:
        """Policy names, sorted."""
        return sorted(self._policies)

    def get(self, name: str) -> Policy | None:
        """The policy called ``name``, or None."""
        return self._policies.get(name)
