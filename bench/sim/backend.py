"""The in-process :class:`bench.backend.Backend`: a fresh simulated fleet per replay."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.policies import build_policy
from bench.results import PolicyRun
from bench.sim.config import SimSettings
from bench.sim.replay import simulate
from bench.sim.replicas import ReplicaSettings
from bench.sim.timing import RequestTiming
from bench.workloads.base import Workload
from router_service.policies.base import Policy
from router_service.policies.kv_aware import KvAwareSettings


class SimBackend:
    """Replays on :func:`bench.sim.replay.simulate` with the given engine settings."""

    mode = "sim"

    def __init__(self, settings: SimSettings, seed: int = 0,
                 progress: Callable[[int], None] | None = None,
                 kv_settings: KvAwareSettings | None = None,
                 replicas: ReplicaSettings | None = None,
                 node_ids: Sequence[str] | None = None,
                 timing: Mapping[str, RequestTiming] | None = None) -> None:
        self.settings = settings
        self.node_ids = node_ids
        """Names of the simulated nodes (default ``node-<i>``): a stack run's, to compare."""
        self.timing = timing or {}
        """Per policy name: a stack run's measured timing per request, replayed
        (:mod:`bench.sim.timing`); key ``*`` serves the policies not named."""
        self.replicas = replicas
        self.kv_settings = kv_settings
        self.seed = seed
        self.progress = progress

    def replay(self, workload: Workload, policy_name: str) -> PolicyRun:
        """Replay ``workload`` under a freshly built ``policy_name``."""
        over: dict[type[Any], Any] = {}
        if self.kv_settings is not None:
            over[KvAwareSettings] = self.kv_settings

        def make() -> Policy:
            return build_policy(policy_name,
                                prefill_tokens_per_s=self.settings.prefill_tokens_per_s,
                                seed=self.seed, overrides=over)

        router_rate = self.kv_settings.kv_prefill_tokens_per_s if self.kv_settings else None
        return simulate(workload, make(), self.settings, self.progress, router_rate,
                        self.replicas, make, self.seed, node_ids=self.node_ids,
                        timing=self.timing.get(policy_name, self.timing.get("*")))
