"""Router against real etcd + registry + router processes.

Nodes are registered with known blocks through the Registry gRPC API from the test, which also
plays their agents' heartbeats. Checks: Route picks the node holding the longest prefix; when that
node's lease expires the same request goes elsewhere; with the registry killed Route still
answers (degraded) and recovers when the registry comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from kvroute.blocks import hash_blocks
from kvroute.procs import free_port
from kvroute.v1 import registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc
from tests.harness import ServerGroup, ServerProcess, scrape, start_server

pytestmark = pytest.mark.integration

BS = 16
MODEL = "m"
PROMPT = list(range(500, 500 + 10 * BS))
HASHES = hash_blocks(PROMPT, BS)


class Agents:
    """Plays node agents: registers nodes with blocks and heartbeats the live ones."""

    def __init__(self, target: str, nodes: dict[str, list[int]]) -> None:
        self.target = target
        self.nodes = nodes
        self.alive = set(nodes)
        self.epochs: dict[str, registry_pb2.RegisterNodeResponse] = {}
        self._task: asyncio.Task[None] | None = None

    async def _register(self, stub: registry_pb2_grpc.RegistryStub, nid: str) -> None:
        r = await stub.RegisterNode(registry_pb2.RegisterNodeRequest(
            node_id=nid, address=f"{nid}.local:8000", model=MODEL, block_size=BS,
            capacity_blocks=1000), timeout=3)
        self.epochs[nid] = r
        await stub.Heartbeat(registry_pb2.HeartbeatRequest(
            node_id=nid, epoch=r.epoch, write_token=r.write_token, stored=self.nodes[nid],
            used_blocks=len(self.nodes[nid]), delta_seq=1), timeout=3)

    async def _loop(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = registry_pb2_grpc.RegistryStub(ch)
            while True:
                for nid in sorted(self.alive):
                    try:
                        if nid not in self.epochs:
                            await self._register(stub, nid)
                            continue
                        reg = self.epochs[nid]
                        r = await stub.Heartbeat(registry_pb2.HeartbeatRequest(
                            node_id=nid, epoch=reg.epoch, write_token=reg.write_token),
                            timeout=1)
                        if r.resync_required:
                            await self._register(stub, nid)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.NOT_FOUND:
                            self.epochs.pop(nid, None)
                await asyncio.sleep(0.3)

    async def start(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = registry_pb2_grpc.RegistryStub(ch)
            for nid in self.nodes:
                await self._register(stub, nid)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _registry(etcd: str, prefix: str, port: int, work: Path, name: str) -> ServerProcess:
    return start_server("registry", [
        "--etcd-endpoints", etcd, "--etcd-prefix", prefix, "--block-size", str(BS),
        "--lease-ttl-s", "2", "--listen", f"127.0.0.1:{port}"], work, name=name)


async def _route(stub: router_pb2_grpc.RouterStub, rid: str) -> router_pb2.RouteResponse:
    return await stub.Route(router_pb2.RouteRequest(request_id=rid, token_ids=PROMPT,
                                                    model=MODEL), timeout=3)


async def _eventually(check: object, timeout_s: float, what: str) -> router_pb2.RouteResponse:
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: object = None
    while True:
        try:
            resp = await check()  # type: ignore[operator]
            if resp is not None:
                return resp  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as exc:
            last = exc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last: {last})")
        await asyncio.sleep(0.1)


Stack = tuple[router_pb2_grpc.RouterStub, "Agents", ServerGroup, ServerProcess]


@pytest.fixture
async def stack(etcd_endpoint: str, etcd_prefix: str, tmp_path: Path,
                request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    mode: str = request.param
    port = free_port()
    procs = ServerGroup(tmp_path)  # the registries; the router is stopped apart (exit code)
    reg = procs.add(_registry(etcd_endpoint, etcd_prefix, port, tmp_path, "registry"))
    agents = Agents(reg.grpc_target, {"a": HASHES[:3], "b": HASHES[:7], "c": []})
    router = None
    try:
        await agents.start()
        router = start_server("router", [
            "--registry", reg.grpc_target, "--registry-mode", mode, "--block-size", str(BS),
            "--default-policy", "kv_aware", "--mirror-max-staleness-s", "1",
            "--registry-retry-max-s", "0.3", "--lookup-timeout-s", "0.3"], tmp_path)
        async with grpc.aio.insecure_channel(router.grpc_target) as ch:
            yield router_pb2_grpc.RouterStub(ch), agents, procs, router
    finally:
        await agents.stop()
        try:
            if router is not None:
                assert router.stop() == 0, "router exits 0 on SIGTERM"
        finally:
            procs.stop()


@pytest.mark.parametrize("stack", ["mirror", "stream"], indirect=True)
async def test_longest_prefix_lease_expiry_and_registry_outage(
        stack: Stack,
        etcd_endpoint: str, etcd_prefix: str, tmp_path: Path) -> None:
    stub, agents, procs, router = stack
    n = iter(range(10**6))

    seen: list[router_pb2.RouteResponse] = []

    async def on(node: str, matched: int | None = None) -> router_pb2.RouteResponse | None:
        r = await _route(stub, f"q{next(n)}")
        seen[:] = [r]
        await stub.Complete(router_pb2.CompleteRequest(request_id=r.request_id))
        ok = r.node_id == node and not r.degraded
        return r if ok and matched in (None, r.matched_blocks) else None

    r = await _eventually(lambda: on("b"), 30, "routed to b (longest prefix)")
    assert r.matched_blocks == 7 and r.expected_cached_tokens == 7 * BS
    assert r.address == "b.local:8000" and r.policy == "kv_aware"

    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "route", "--router", router.grpc_target,
        "--tokens", ",".join(map(str, PROMPT)), "--model", MODEL, "--json",
        stdout=asyncio.subprocess.PIPE)
    out, _ = await cli.communicate()
    assert cli.returncode == 0 and json.loads(out)["node_id"] == "b"

    agents.alive.discard("b")  # b stops heartbeating: its lease (2 s) expires
    r = await _eventually(lambda: on("a"), 10, "b expired, routed to a (next longest)")
    assert r.matched_blocks == 3

    reg = procs.servers[0]
    reg.process.kill()

    async def degraded() -> router_pb2.RouteResponse | None:
        r = await _route(stub, f"d{next(n)}")
        await stub.Complete(router_pb2.CompleteRequest(request_id=r.request_id))
        return r if r.degraded else None

    r = await _eventually(degraded, 10, "degraded answer with the registry down")
    assert r.policy == "least_loaded" and "DEGRADED" in r.reason and r.node_id in ("a", "c")
    stats = await stub.Stats(router_pb2.StatsRequest())
    assert stats.degraded_decisions >= 1 and not stats.registry_connected
    text = await asyncio.to_thread(scrape, router.metrics_url)
    assert 'kvroute_router_decisions_total{outcome="degraded",policy="least_loaded"}' in text
    assert "kvroute_router_registry_connected 0.0" in text
    assert "kvroute_router_registry_staleness_seconds" in text

    port = int(reg.grpc_target.rsplit(":", 1)[1])
    procs.add(_registry(etcd_endpoint, etcd_prefix, port, tmp_path, "registry2"))
    try:
        # the leases expired while the registry was down: the agents register again and send
        # their blocks in the next call, so wait for a's blocks, not just for a
        r = await _eventually(lambda: on("a", 3), 20, "recovered after the registry came back")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last answer: {seen}") from None
    assert r.matched_blocks == 3
