"""A registry restarted after an outage just under the lease life keeps its nodes: it renews
the leases of the nodes it loaded (and trusts for one TTL) instead of letting etcd expire them
moments after it serves, before their agents' next heartbeat gets through."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kvroute.v1 import registry_pb2 as pb
from tests.integration.test_registry_etcd import client, cred, register, registry

pytestmark = pytest.mark.integration
TTL = 12
"""Long enough that a loaded machine restarts the registry (after a 3-s outage) well within it:
with 8 s a restart slower than 4.5 s failed the test's own guard below."""


async def test_a_restarted_registry_renews_the_leases_it_loaded(
        etcd_endpoint: str, etcd_prefix: str, tmp_path: Path) -> None:
    procs = [registry(etcd_endpoint, etcd_prefix, tmp_path, "r1", ttl=TTL)]
    try:
        async with client(procs[0]) as s1:
            reg = await register(s1, "a", TTL)
            await s1.Heartbeat(pb.HeartbeatRequest(node_id="a", **cred(reg), stored=[1, 2, 3],
                                                   used_blocks=3, delta_seq=1), timeout=5)
            t0 = time.monotonic()  # the lease runs until t0 + TTL unless renewed
        procs[0].process.kill()
        await asyncio.sleep(3.0)
        procs.append(await asyncio.to_thread(
            registry, etcd_endpoint, etcd_prefix, tmp_path, "r1b", TTL))
        assert time.monotonic() - t0 < TTL - 0.5, "the restart took too long to test anything"
        await asyncio.sleep(max(0.0, t0 + TTL + 1.5 - time.monotonic()))
        async with client(procs[1]) as s2:
            nodes = (await s2.ListNodes(pb.ListNodesRequest(), timeout=5)).nodes
        # no agent heartbeated the new replica: only the renewal kept the node
        assert [(n.node_id, n.blocks_indexed) for n in nodes] == [("a", 3)]
    finally:
        for p in procs:
            p.stop()
