"""Each stack replay starts from the same state (issue 19, s26).

Measured: on one reused fleet the second replay gained ~0.006 hit rate, whichever policy it was.
Emptying the caches does not make a fleet new: the agents keep the prefill rate they measured for
each engine and the registry keeps serving it, so only the first replay starts uncalibrated.
Real etcd, registry, engines and agents; the registry's own ListNodes is what routers read.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from bench.stack_backend import StackBackend
from bench.stack_fleet import FleetSpec
from bench.workloads import load_workload
from kvroute.v1 import registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.integration


async def _rates(target: str) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await registry_pb2_grpc.RegistryStub(ch).ListNodes(
            registry_pb2.ListNodesRequest(), timeout=10)
    return {n.node_id: n.prefill_tokens_per_s for n in resp.nodes}


def test_a_reused_fleet_carries_the_measured_prefill_rates_a_new_one_does_not(
        tmp_path: Path) -> None:
    wl = load_workload(trace=None, workload=None, seed=0, start=0, limit=60)
    spec = FleetSpec(nodes=2, cache_blocks=2000, block_size=wl.block_size, time_scale=0.2)
    with StackBackend(tmp_path / "stack", spec, fresh_fleet=True) as stack:
        assert set(asyncio.run(_rates(stack.fleet.registry_target)).values()) == {0.0}
        first = stack.replay(wl, "kv_aware")
        assert first.failed == 0
        asyncio.run(stack.reset_fleet())  # what the bench did between replays before s26
        carried = asyncio.run(_rates(stack.fleet.registry_target))
        assert all(r > 0 for r in carried.values()), carried  # emptied, yet calibrated
        second = stack.replay(wl, "kv_aware#2")  # a new fleet before every later replay
        assert second.failed == 0 and second.policy == "kv_aware#2"
        assert stack.fleets_started == 2
        assert (tmp_path / "stack-2" / "logs").is_dir()
        stack.new_fleet()  # ... which starts as the first one did: nothing measured yet
        assert set(asyncio.run(_rates(stack.fleet.registry_target)).values()) == {0.0}
    assert not stack.fleet._procs and stack.fleet.etcd is None  # everything stopped
