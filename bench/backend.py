"""Where a replay runs: the in-process simulation now, the real stack later.

A :class:`Backend` replays one workload under one policy on a fresh fleet (caches empty) and
returns a :class:`bench.results.PolicyRun` whose numbers come from the engines (simulated or
real), never from the router. ``kvroute bench`` only talks to this interface, so ``--mode stack``
plugs in as another Backend (real etcd, registry, router, agents and engine_sim processes, see
``bench/stack_fleet.py``) and the report, JSON and plots stay the same.
"""

from __future__ import annotations

from typing import Protocol

from bench.results import PolicyRun
from bench.workloads.base import Workload


class Backend(Protocol):
    """A fleet that can replay a workload under a named policy."""

    mode: str
    """``sim`` or ``stack``."""

    def replay(self, workload: Workload, policy_name: str) -> PolicyRun:
        """Replay ``workload`` on a fresh fleet routed by ``policy_name``."""
        ...
