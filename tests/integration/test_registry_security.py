"""Registry security with real processes and certificates made in the test.

- mTLS registry (--auth required, --tls-ca-file): identities from client certificates'
  spiffe://kvroute/<role>/<name> URI SANs. A reader cannot write; an agent cannot write another
  node; re-registering a live node from another identity is refused and its blocks stay; a
  client without a certificate cannot even connect; the router reads with a reader certificate.
- token registry (--auth required, --auth-tokens-file): no token -> UNAUTHENTICATED, unknown
  token -> UNAUTHENTICATED, reader token cannot write; the real agent link sends its token.
- open registry (--auth none): the epoch shown by ListNodes no longer keeps a dead node alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from kvroute.blocks import HASH_SCHEME
from kvroute.grpcutil import open_channel
from kvroute.settings import TLSSettings
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from kvroute.v1 import router_pb2, router_pb2_grpc
from tests.harness import ServerProcess, running_server

pytest.importorskip("cryptography")
from tests.certs import CertAuthority, CertFiles

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
BS = 16


def _registry_args(etcd: str, prefix: str, *extra: str, ttl: int = 2) -> list[str]:
    return ["--etcd-endpoints", etcd, "--etcd-prefix", prefix, "--block-size", str(BS),
            "--lease-ttl-s", str(ttl), "--heartbeat-interval-s", "0.5", *extra]


@contextlib.asynccontextmanager
async def stub_for(target: str, tls: TLSSettings | None = None,
                   ) -> AsyncIterator[pb_grpc.RegistryStub]:
    async with open_channel(target, tls) as ch:
        yield pb_grpc.RegistryStub(ch)


def mtls(ca: CertAuthority, cert: CertFiles | None) -> TLSSettings:
    return TLSSettings(ca_file=str(ca.ca_file), cert_file=str(cert.cert) if cert else "",
                       key_file=str(cert.key) if cert else "", server_name="localhost")


async def code_of(aw: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await aw  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


def reg_req(node: str, capacity: int = 1000) -> pb.RegisterNodeRequest:
    return pb.RegisterNodeRequest(node_id=node, address=f"{node}.local:8000", model="m",
                                  block_size=BS, capacity_blocks=capacity,
                                  hash_scheme=HASH_SCHEME)


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    return CertAuthority(tmp_path / "pki")


@pytest.fixture
def mtls_registry(etcd_endpoint: str, etcd_prefix: str, tmp_path: Path, ca: CertAuthority,
                  ) -> ServerProcess:
    srv = ca.server()
    with running_server("registry", _registry_args(
            etcd_endpoint, etcd_prefix, "--auth", "required", "--tls-cert-file",
            str(srv.cert), "--tls-key-file", str(srv.key), "--tls-ca-file", str(ca.ca_file),
            ttl=30),
            tmp_path, name="registry-mtls") as proc:
        yield proc


async def test_mtls_identities(mtls_registry: ServerProcess, ca: CertAuthority,
                               tmp_path: Path) -> None:
    target = mtls_registry.grpc_target
    agent1, agent2 = ca.client("agent", "node-1"), ca.client("agent", "node-2")
    reader = ca.client("reader", "router")
    async with stub_for(target, mtls(ca, agent1)) as a1, \
            stub_for(target, mtls(ca, agent2)) as a2, \
            stub_for(target, mtls(ca, reader)) as rd:
        r1 = await a1.RegisterNode(reg_req("node-1"), timeout=5)
        assert r1.write_token and len(r1.write_token) >= 32
        await a1.Heartbeat(pb.HeartbeatRequest(node_id="node-1", epoch=r1.epoch,
                                               write_token=r1.write_token, stored=[1, 2, 3],
                                               delta_seq=1), timeout=5)
        # a reader cannot write, and the message names who it is and what it may do
        code, msg = await code_of(rd.RegisterNode(reg_req("node-9"), timeout=5))
        assert code == Code.PERMISSION_DENIED
        assert "reader:router" in msg and "Lookup" in msg, msg
        code, msg = await code_of(rd.Heartbeat(pb.HeartbeatRequest(
            node_id="node-1", epoch=r1.epoch), timeout=5))
        assert code == Code.PERMISSION_DENIED and "reader:router" in msg
        # an agent cannot write another node, nor re-register a live one
        code, msg = await code_of(a2.RegisterNode(reg_req("node-1"), timeout=5))
        assert code == Code.PERMISSION_DENIED and "agent:node-2" in msg and "node-1" in msg
        code, _ = await code_of(a2.Heartbeat(pb.HeartbeatRequest(
            node_id="node-1", epoch=r1.epoch, write_token=r1.write_token, cleared=True,
            delta_seq=2), timeout=5))
        assert code == Code.PERMISSION_DENIED
        code, _ = await code_of(a2.DeregisterNode(pb.DeregisterNodeRequest(node_id="node-1"),
                                                  timeout=5))
        assert code == Code.PERMISSION_DENIED
        # agents only write: reading is for readers
        code, msg = await code_of(a1.ListNodes(pb.ListNodesRequest(), timeout=5))
        assert code == Code.PERMISSION_DENIED and "agent:node-1" in msg
        # node-1 is unchanged: same epoch, same blocks
        nodes = (await rd.ListNodes(pb.ListNodesRequest(), timeout=5)).nodes
        assert [(n.node_id, n.epoch, n.blocks_indexed) for n in nodes] == [
            ("node-1", r1.epoch, 3)]
        got = await rd.Lookup(pb.LookupRequest(block_hashes=[1, 2, 3], model="m"), timeout=5)
        assert [(n.node_id, n.matched_blocks) for n in got.nodes] == [("node-1", 3)]
        # the router reads placement with its reader certificate
        with running_server("router", [
                "--registry", f"localhost:{target.rsplit(':', 1)[1]}", "--block-size", str(BS),
                "--client-tls-ca-file", str(ca.ca_file), "--client-tls-cert-file",
                str(reader.cert), "--client-tls-key-file", str(reader.key)],
                tmp_path, name="router-mtls") as router:
            async with grpc.aio.insecure_channel(router.grpc_target) as ch:
                rs = router_pb2_grpc.RouterStub(ch)
                deadline = time.monotonic() + 15
                while True:
                    resp: object = None
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        resp = await rs.Route(router_pb2.RouteRequest(
                            request_id="r", model="m", token_ids=list(range(64))), timeout=5)
                    if (isinstance(resp, router_pb2.RouteResponse) and resp.node_id == "node-1"
                            and "degraded" not in resp.reason):
                        break
                    assert time.monotonic() < deadline, (resp, router.process)
                    await asyncio.sleep(0.2)
                    await a1.Heartbeat(pb.HeartbeatRequest(
                        node_id="node-1", epoch=r1.epoch, write_token=r1.write_token),
                        timeout=5)
    # no client certificate: the TLS handshake itself is refused
    async with stub_for(target, mtls(ca, None)) as anon:
        code, _ = await code_of(anon.ListNodes(pb.ListNodesRequest(), timeout=5))
        assert code == Code.UNAVAILABLE
    # a certificate from another CA is refused too
    other = CertAuthority(tmp_path / "other-pki", "rogue-ca")
    rogue = other.client("agent", "node-1")
    async with stub_for(target, mtls(ca, rogue)) as rg:
        code, _ = await code_of(rg.RegisterNode(reg_req("node-1"), timeout=5))
        assert code == Code.UNAVAILABLE


async def _exchange(target: str, tls: TLSSettings | None) -> grpc.StatusCode:
    """Join RouteShare.Exchange and read the hub's first message: OK, or the refusal."""
    from kvroute.v1 import route_share_pb2 as rs
    from kvroute.v1 import route_share_pb2_grpc as rs_grpc

    async def hello() -> AsyncIterator[rs.RouteShareMessage]:
        yield rs.RouteShareMessage(hello=rs.RouteShareHello(replica_id="test-replica"))
        await asyncio.sleep(5)

    async with open_channel(target, tls) as ch:
        call = rs_grpc.RouteShareStub(ch).Exchange(hello(), timeout=5)
        try:
            await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        call.cancel()
        return Code.OK


async def test_bearer_tokens(etcd_endpoint: str, etcd_prefix: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# role:name token\nagent:node-7 agent-secret-7\n"
                      "reader:gateway reader-secret\n")
    with running_server("registry", _registry_args(
            etcd_endpoint, etcd_prefix, "--auth", "required", "--auth-tokens-file",
            str(tokens)), tmp_path, name="registry-tokens") as reg:
        target = reg.grpc_target
        async with stub_for(target) as anon:
            code, msg = await code_of(anon.ListNodes(pb.ListNodesRequest(), timeout=5))
            assert code == Code.UNAUTHENTICATED and "Bearer" in msg
            code, _ = await code_of(anon.RegisterNode(reg_req("node-7"), timeout=5))
            assert code == Code.UNAUTHENTICATED
        async with stub_for(target, TLSSettings(token="wrong")) as bad:
            code, msg = await code_of(bad.ListNodes(pb.ListNodesRequest(), timeout=5))
            assert code == Code.UNAUTHENTICATED and "not known" in msg
        reader_file = tmp_path / "reader.token"
        reader_file.write_text("reader-secret\n")
        async with stub_for(target, TLSSettings(token_file=str(reader_file))) as rd:
            await rd.ListNodes(pb.ListNodesRequest(), timeout=5)
            code, msg = await code_of(rd.RegisterNode(reg_req("node-7"), timeout=5))
            assert code == Code.PERMISSION_DENIED and "reader:gateway" in msg
        # the router replicas' shared view (RouteShare.Exchange) is for readers only
        assert await _exchange(target, None) == Code.UNAUTHENTICATED
        assert await _exchange(target, TLSSettings(token_file=str(reader_file))) == Code.OK
        agent_only = tmp_path / "agent-only.token"
        agent_only.write_text("agent-secret-7")
        assert await _exchange(target, TLSSettings(token_file=str(agent_only))) \
            == Code.PERMISSION_DENIED
        # the real agent link (node_agent) registers, resyncs and heartbeats with its token
        from node_agent.block_map import BlockMap
        from node_agent.deltas import DeltaLog
        from node_agent.registry_link import RegistryLink
        from node_agent.settings import AgentSettings
        from node_agent.usage import UsageProbe

        agent_file = tmp_path / "agent.token"
        agent_file.write_text("agent-secret-7")
        s = AgentSettings(registry=target, node_id="node-7", engine_url="http://e:1",
                          model="m", capacity_blocks=100, client_token_file=str(agent_file),
                          heartbeat_interval_s=0.2)
        deltas = DeltaLog()
        blocks = BlockMap(s.block_size, deltas, capacity_blocks=100)
        link = RegistryLink(s, blocks, deltas, UsageProbe("", lambda: 0))
        task = asyncio.create_task(link.run())
        try:
            async with stub_for(target, TLSSettings(token_file=str(reader_file))) as rd:
                deadline = time.monotonic() + 15
                while link.stats.heartbeats < 2:
                    assert time.monotonic() < deadline, "agent link never heartbeated"
                    await asyncio.sleep(0.1)
                nodes = (await rd.ListNodes(pb.ListNodesRequest(), timeout=5)).nodes
                assert [n.node_id for n in nodes] == ["node-7"] and nodes[0].healthy
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await link.deregister()
            await link.close()


async def test_epoch_from_list_nodes_no_longer_keeps_a_dead_node_alive(
        etcd_endpoint: str, etcd_prefix: str, tmp_path: Path) -> None:
    with running_server("registry", _registry_args(etcd_endpoint, etcd_prefix), tmp_path,
                        name="registry-open") as reg:
        async with stub_for(reg.grpc_target) as st:
            r = await st.RegisterNode(reg_req("victim"), timeout=5)
            await st.Heartbeat(pb.HeartbeatRequest(node_id="victim", epoch=r.epoch,
                                                   write_token=r.write_token, stored=[7, 8],
                                                   delta_seq=1), timeout=5)
            # the agent dies; a reader learns the epoch from ListNodes and heartbeats with it
            listed = (await st.ListNodes(pb.ListNodesRequest(), timeout=5)).nodes[0]
            assert listed.epoch == r.epoch
            t0 = time.monotonic()
            refused = 0
            gone_after = None
            while time.monotonic() - t0 < 8:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    nodes = (await st.ListNodes(pb.ListNodesRequest(), timeout=5)).nodes
                    if not nodes:
                        gone_after = time.monotonic() - t0
                        break
                code, msg = await code_of(st.Heartbeat(pb.HeartbeatRequest(
                    node_id="victim", epoch=listed.epoch, stored=[9], delta_seq=2),
                    timeout=5))
                assert code == Code.PERMISSION_DENIED and "write_token" in msg, msg
                refused += 1
                await asyncio.sleep(0.2)
            assert gone_after is not None and gone_after <= 4.5, (gone_after, refused)
            assert refused >= 3
