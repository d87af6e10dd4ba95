"""Registry processes on a real etcd: replicas, crash recovery, lease expiry, etcd outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from kvroute.blocks import HASH_SCHEME
from kvroute.embedded_etcd import EmbeddedEtcd
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from registry_service.store.etcd_client import EtcdClient, EtcdSettings
from tests.harness import ServerProcess, scrape, start_server

pytestmark = pytest.mark.integration
TTL = 2
INTERVAL = 0.5
"""How often the tests' Beater heartbeats."""
SUGGESTED = 1.5
"""The registries' suggested heartbeat interval: a node is late (unhealthy) after 2 x 1.5 +
0.5 s without a heartbeat. (With INTERVAL it was 1.5 s, and a loaded machine's stall that long
showed the heartbeating node b unhealthy in `kvroute nodes`.)"""


def registry(endpoint: str, prefix: str, workdir: Path, name: str, ttl: int = TTL,
             call_timeout: float = 1.0) -> ServerProcess:
    return start_server("registry", [
        "--etcd-endpoints", endpoint, "--etcd-prefix", prefix, "--lease-ttl-s", str(ttl),
        "--heartbeat-interval-s", str(SUGGESTED), "--status-write-interval-s", "0.5",
        "--etcd-call-timeout-s", str(call_timeout), "--etcd-retry-attempts", "2",
        "--snapshot-threshold", "4", "--replica-id", name], workdir, name=name)


@contextlib.asynccontextmanager
async def client(srv: ServerProcess) -> AsyncIterator[pb_grpc.RegistryStub]:
    async with grpc.aio.insecure_channel(srv.grpc_target) as ch:
        yield pb_grpc.RegistryStub(ch)


async def register(stub: pb_grpc.RegistryStub, node: str, ttl_hint: int = TTL,
                   ) -> pb.RegisterNodeResponse:
    resp = await stub.RegisterNode(pb.RegisterNodeRequest(
        node_id=node, address=f"{node}:8000", model="m", block_size=16, capacity_blocks=100,
        hash_scheme=HASH_SCHEME), timeout=5)
    assert resp.lease_ttl_s == ttl_hint
    return resp


def cred(reg: pb.RegisterNodeResponse) -> dict[str, object]:
    """The epoch and write token a heartbeat of this registration carries."""
    return {"epoch": reg.epoch, "write_token": reg.write_token}


async def matched(stub: pb_grpc.RegistryStub, hashes: list[int]) -> dict[str, int]:
    resp = await stub.Lookup(pb.LookupRequest(block_hashes=hashes, model="m",
                                              include_unhealthy=True), timeout=5)
    return {n.node_id: n.matched_blocks for n in resp.nodes}


async def offloaded(stub: pb_grpc.RegistryStub, hashes: list[int]) -> dict[str, int]:
    """Offloaded blocks continuing each node's GPU prefix (nodes with some)."""
    resp = await stub.Lookup(pb.LookupRequest(block_hashes=hashes, model="m",
                                              include_unhealthy=True), timeout=5)
    return {n.node_id: n.offloaded_blocks for n in resp.nodes if n.offloaded_blocks}


async def eventually(check: Callable[[], object], within_s: float, what: str) -> float:
    """Await ``check()`` (a coroutine factory) until truthy; returns the seconds it took."""
    t0 = time.monotonic()
    last: object = None
    while time.monotonic() - t0 < within_s:
        with contextlib.suppress(grpc.aio.AioRpcError):
            last = await check()  # type: ignore[misc]
            if last:
                return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {within_s}s (last: {last!r})")


class Beater:
    """Heartbeats one node every INTERVAL until stopped."""

    def __init__(self, stub: pb_grpc.RegistryStub, node: str,
                 reg: pb.RegisterNodeResponse) -> None:
        self.stub, self.node, self.epoch, self.token = stub, node, reg.epoch, reg.write_token
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.Heartbeat(pb.HeartbeatRequest(
                    node_id=self.node, epoch=self.epoch, write_token=self.token), timeout=2)
            await asyncio.sleep(INTERVAL)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def etcd_keys(endpoint: str, prefix: str) -> list[str]:
    async with EtcdClient(EtcdSettings(etcd_endpoints=(endpoint,), etcd_prefix=prefix)) as c:
        kvs, _ = await c.get_prefix(prefix.encode())
    return [kv.key.decode()[len(prefix):] for kv in kvs]


async def test_replicas_crash_recovery_and_lease_expiry(
        etcd_endpoint: str, etcd_prefix: str, tmp_path: Path) -> None:
    r1 = registry(etcd_endpoint, etcd_prefix, tmp_path, "r1")
    r2 = registry(etcd_endpoint, etcd_prefix, tmp_path, "r2")
    r3: ServerProcess | None = None
    try:
        async with client(r2) as s2:
            async with client(r1) as s1:
                ea, eb = await register(s1, "a"), await register(s2, "b")
                chain = list(range(100, 140))
                # 'a' heartbeats replica 1, 'b' replica 2; deltas past the snapshot threshold
                # (with offloaded blocks: a's go into its compacted snapshot, b's stay a delta)
                for seq in range(1, 9):
                    await s1.Heartbeat(pb.HeartbeatRequest(
                        node_id="a", **cred(ea), delta_seq=seq,
                        stored=chain[(seq - 1) * 5:seq * 5],
                        stored_offloaded=[1] if seq == 1 else []))
                await s2.Heartbeat(pb.HeartbeatRequest(node_id="b", **cred(eb), delta_seq=1,
                                                       stored=chain[:7],
                                                       stored_offloaded=chain[7:12]))
                want = {"a": 40, "b": 7}
                want_off = {"a": 1, "b": 5}  # GPU prefix, then the offloaded tier
                # keep both alive through replica 2 (a registered on replica 1)
                beat_a, beat_b = Beater(s2, "a", ea), Beater(s2, "b", eb)
                assert await matched(s1, [*chain, 1]) == want or await eventually(
                    lambda: _eq(matched(s1, [*chain, 1]), want), 3, "r1 converges")
                await eventually(lambda: _eq(matched(s2, [*chain, 1]), want), 3,
                                 "r2 converges")
                assert await matched(s2, chain[:3]) == {"a": 3, "b": 3}
                await eventually(lambda: _eq(offloaded(s2, [*chain, 1]), want_off), 3,
                                 "r2 has the offloaded tier")
                keys = await etcd_keys(etcd_endpoint, etcd_prefix)
                assert len([k for k in keys if k.startswith("placement/a/")]) < 10  # compacted

            r1.process.kill()  # SIGKILL: a new replica answers from etcd alone
            r3 = await asyncio.to_thread(registry, etcd_endpoint, etcd_prefix, tmp_path, "r3")
            async with client(r3) as s3:
                assert await matched(s3, [*chain, 1]) == want
                assert await offloaded(s3, [*chain, 1]) == want_off  # rebuilt from etcd
                await beat_b.stop()
                beat_b = Beater(s3, "b", eb)  # a heartbeat to any replica refreshes the lease
                await beat_a.stop()
                t_stop = time.monotonic()  # 'a' stops heartbeating now
                took = await eventually(lambda: _gone(s2, s3, "a"), TTL + INTERVAL + 3,
                                        "a leaves both replicas")
                gone_s = time.monotonic() - t_stop
                print(f"node gone from both replicas {gone_s:.2f}s after its last heartbeat")
                assert gone_s <= TTL + INTERVAL + 1.0, took  # 1 s: etcd expiry tick + watch
                assert await matched(s3, chain) == {"b": 7}
                assert await matched(s2, chain) == {"b": 7}
                keys = await etcd_keys(etcd_endpoint, etcd_prefix)
                assert not [k for k in keys if k.endswith("/a") or "/a/" in k], keys
                assert "nodes/b" in keys
                await check_cli_and_metrics(r3)
                await beat_b.stop()
        assert r2.stop() == 0  # SIGTERM drains and exits 0
    finally:
        for srv in (r1, r2, r3):
            if srv is not None:
                srv.stop()


async def check_cli_and_metrics(srv: ServerProcess) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "nodes", "--registry", srv.grpc_target, "--json",
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    nodes = json.loads(out)["nodes"]
    assert [(n["node_id"], n["blocks_indexed"]) for n in nodes] == [("b", "7")]
    assert nodes[0]["healthy"] and 0 < nodes[0]["lease_remaining_s"] <= TTL
    text = await asyncio.to_thread(scrape, srv.metrics_url)
    for name in ("kvroute_registry_nodes 1.0", "kvroute_registry_heartbeats_total",
                 "kvroute_registry_lease_expiries_total", "kvroute_registry_index_bytes",
                 "kvroute_registry_store_op_seconds_bucket"):
        assert name in text, name


async def _eq(aw: object, want: object) -> bool:
    return bool(await aw == want)  # type: ignore[misc]


async def _gone(s2: pb_grpc.RegistryStub, s3: pb_grpc.RegistryStub, node: str) -> bool:
    for stub in (s2, s3):
        lst = await stub.ListNodes(pb.ListNodesRequest(), timeout=2)
        if node in [n.node_id for n in lst.nodes] or node in await matched(stub, [1]):
            return False
    return True


async def test_etcd_restart_and_pause(own_etcd: EmbeddedEtcd, etcd_prefix: str,
                                      tmp_path: Path) -> None:
    ep = own_etcd.endpoint
    r1 = registry(ep, etcd_prefix, tmp_path, "p1", ttl=8, call_timeout=0.5)
    r2 = registry(ep, etcd_prefix, tmp_path, "p2", ttl=8, call_timeout=0.5)
    try:
        async with client(r1) as s1, client(r2) as s2:
            e = await register(s1, "a", 8)
            await s1.Heartbeat(pb.HeartbeatRequest(node_id="a", **cred(e), delta_seq=1,
                                                   stored=[1, 2, 3]))
            await eventually(lambda: _eq(matched(s2, [1, 2, 3]), {"a": 3}), 3, "r2 sees a")
            beat = Beater(s1, "a", e)  # keeps 'a' healthy (late after 3.5 s)
            before = await s2.ListNodes(pb.ListNodesRequest())

            await asyncio.to_thread(own_etcd.restart)  # same data dir; replicas keep serving
            assert await matched(s1, [1, 2, 3]) == {"a": 3}
            await eventually(lambda: s1.Heartbeat(pb.HeartbeatRequest(
                node_id="a", **cred(e), delta_seq=2, stored=[4]), timeout=3), 10,
                "heartbeat after etcd restart")
            await eventually(lambda: _eq(matched(s2, [1, 2, 3, 4]), {"a": 4}), 10,
                             "r2 re-watched after the restart")
            after = await s2.ListNodes(pb.ListNodesRequest())
            assert [(n.node_id, n.epoch, n.address) for n in after.nodes] == [
                (n.node_id, n.epoch, n.address) for n in before.nodes]

            assert own_etcd.process is not None
            own_etcd.process.signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await s1.Heartbeat(pb.HeartbeatRequest(node_id="a", **cred(e), delta_seq=3,
                                                           stored=[5]), timeout=20)
                waited = time.monotonic() - t0
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
                assert waited < 5, f"the call hung for {waited:.1f}s"
                assert await matched(s1, [1, 2, 3, 4]) == {"a": 4}  # lookups need no etcd
            finally:
                own_etcd.process.signal(signal.SIGCONT)
            await eventually(lambda: s1.Heartbeat(pb.HeartbeatRequest(
                node_id="a", **cred(e), delta_seq=3, stored=[5]), timeout=3), 10,
                "heartbeat after SIGCONT")
            for stub in (s1, s2):
                await eventually(lambda st=stub: _eq(matched(st, [1, 2, 3, 4, 5]), {"a": 5}),
                                 10, "nothing lost after the pause")
            await beat.stop()
    finally:
        r1.stop()
        r2.stop()
