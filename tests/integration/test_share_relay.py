"""Router replicas on different registry replicas share one view through the hubs' relay
(issue 19): real etcd, two real registry processes, routing runtimes each streaming to a
different registry, over loopback gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from kvroute.blocks import HASH_SCHEME
from kvroute.embedded_etcd import EmbeddedEtcd
from kvroute.grpcutil import open_channel
from kvroute.procs import free_port
from kvroute.settings import TLSSettings
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from kvroute.v1 import route_share_pb2 as rs
from kvroute.v1 import route_share_pb2_grpc as rs_grpc
from registry_service.store.etcd_client import EtcdClient, EtcdSettings
from registry_service.store.etcd_hubs import EtcdHubDirectory
from registry_service.store.hubs import HubRecord
from router_service.domain import RouteRequest
from router_service.runtime import RoutingRuntime
from router_service.settings import RouterSettings
from tests.certs import CertAuthority
from tests.harness import ServerGroup, ServerProcess, metric, scrape, until

BS = 16
LONG = list(range(900, 900 + 32 * BS))



async def _metric_until(srv: ServerProcess, name: str, value: float,
                        within_s: float = 20.0) -> None:
    for _ in range(int(within_s / 0.1)):
        if metric(await asyncio.to_thread(scrape, srv.metrics_url), name) == value:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} of {srv.process.name} never reached {value}: "
                         f"{metric(scrape(srv.metrics_url), name)}\n{srv.process.tail()}")


def _registry(group: ServerGroup, name: str, etcd: str, prefix: str, port: int,
              *extra: str) -> ServerProcess:
    return group.start("registry", [
        "--etcd-endpoints", etcd, "--etcd-prefix", prefix, "--block-size", str(BS),
        "--lease-ttl-s", "30", "--replica-id", name, "--listen", f"127.0.0.1:{port}",
        "--share-relay-ttl-s", "3", "--share-relay-timeout-s", "3",
        "--share-relay-retry-max-s", "0.5", *extra], name=name)


async def _heartbeat(target: str, nodes: list[str], tls: TLSSettings | None,
                     started: asyncio.Event) -> None:
    """Register ``nodes`` and keep them healthy (an agent's part, over the real API)."""
    async with open_channel(target, tls) as ch:
        stub = pb_grpc.RegistryStub(ch)
        regs = [await stub.RegisterNode(pb.RegisterNodeRequest(
            node_id=n, address=f"{n}:8000", model="m", block_size=BS, capacity_blocks=1000,
            hash_scheme=HASH_SCHEME), timeout=10) for n in nodes]
        started.set()
        while True:
            for n, r in zip(nodes, regs, strict=True):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Heartbeat(pb.HeartbeatRequest(
                        node_id=n, epoch=r.epoch, write_token=r.write_token), timeout=5)
            await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def _agents(target: str, tls: TLSSettings | None = None) -> AsyncIterator[None]:
    started = asyncio.Event()
    task = asyncio.create_task(_heartbeat(target, ["n1", "n2", "n3"], tls, started))
    try:
        await asyncio.wait_for(started.wait(), 15)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _router(target: str, rid: str, **client: str) -> RoutingRuntime:
    return RoutingRuntime(RouterSettings(registry=target, share_routes=True,
                                         router_replica_id=rid, share_timeout_s=3.0,
                                         block_size=BS, **client),  # type: ignore[arg-type]
                          None, CollectorRegistry())


@contextlib.asynccontextmanager
async def _routers(*pairs: tuple[str, str], **client: str,
                   ) -> AsyncIterator[list[RoutingRuntime]]:
    rts = [_router(t, rid, **client) for t, rid in pairs]
    try:
        for rt in rts:
            await rt.start()
        for rt in rts:
            await until(lambda c=rt.core: c.source.connected and c.share is not None  # type: ignore[misc]
                         and c.share.live() and c.healthy_node_count() == 3,
                         what="router connected, sharing and knowing the 3 nodes")
        yield rts
    finally:
        for rt in rts:
            await rt.stop()


def _share(rt: RoutingRuntime):  # type: ignore[no-untyped-def]
    share = rt.core.share
    assert share is not None
    return share


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ServerGroup]:
    with ServerGroup(tmp_path) as g:
        yield g


async def test_routers_on_three_registries_share_one_view(
        etcd_endpoint: str, etcd_prefix: str, group: ServerGroup) -> None:
    regs = [_registry(group, f"reg-{x}", etcd_endpoint, etcd_prefix, free_port())
            for x in "abc"]
    for reg in regs:  # a full mesh: each hub relays to the two others
        await _metric_until(reg, "kvroute_registry_route_share_relay_links", 2)
    reg_a, reg_b, reg_c = regs
    async with _agents(reg_a.grpc_target), _routers(
            (reg_a.grpc_target, "ra"), (reg_b.grpc_target, "rb"),
            (reg_c.grpc_target, "rc")) as (a, b, c):
        sa, sb, sc = _share(a), _share(b), _share(c)
        # a's decision reaches b through hub A -> relay -> hub B, and the other way round
        d1 = await a.core.decide(RouteRequest("q1", token_ids=LONG))
        await until(lambda: sb.remote.inflight(d1.node_id) == 1, what="b hears a's route")
        assert sb.peers() == 1  # the replica on the other registry counts as a peer
        follow = [*LONG, *range(7000, 7000 + 2 * BS)]
        d2 = await b.core.decide(RouteRequest("q2", token_ids=follow))
        assert d2.node_id == d1.node_id and "routed there, not yet reported" in d2.reason
        await until(lambda: sa.remote.inflight(d2.node_id) == 1, what="a hears b's route")
        await until(lambda: sc.remote.total == 2, what="c hears both")
        assert sa.peers() == 1 and sc.peers() == 2
        # many requests: every delta applied exactly once, none echoed back to its sender,
        # none relayed twice (three hubs: a re-relayed delta would arrive twice somewhere)
        for i in range(20):
            await a.core.decide(RouteRequest(f"m{i}", token_ids=list(range(i * 1000,
                                                                          i * 1000 + 64))))
        await until(lambda: sb.remote.total == 21, what="b counts a's 21 requests")
        for i in range(20):
            assert a.core.complete(f"m{i}")
        assert b.core.complete("q1")  # a Complete landing on another replica
        await until(lambda: sb.remote.total == 0 and a.core.tracker.inflight(d1.node_id) == 0,
                     what="completions release everywhere")
        assert b.core.complete("q2")
        await until(lambda: sa.remote.total == 0 and sc.remote.total == 0,
                     what="a and c release b's request")
        await asyncio.sleep(0.5)  # nothing late, nothing twice
        assert sa.remote.total == 0 and sb.remote.total == 0 and sc.remote.total == 0
        assert sb.applied_total == 21 + 20  # a's 21 routes + 20 completes, once each
        assert sa.applied_total == 1 + 2  # b's route, b's two completes (q1 and q2)
        assert sc.applied_total == 41 + 3
        text = [scrape(r.metrics_url) for r in regs]
        assert metric(text[0], "kvroute_registry_route_share_relayed_out_total") == 41 * 2
        assert metric(text[1], "kvroute_registry_route_share_relayed_in_total") == 41
        assert metric(text[0], "kvroute_registry_route_share_relayed_in_total") == 3
        assert metric(text[2], "kvroute_registry_route_share_relayed_in_total") == 44
        assert metric(text[2], "kvroute_registry_route_share_relayed_out_total") == 0
        assert sum(metric(t, "kvroute_registry_route_share_relay_dropped_total")
                   for t in text) == 0


async def test_a_hub_that_dies_or_restarts_is_relayed_to_again(
        etcd_endpoint: str, etcd_prefix: str, group: ServerGroup) -> None:
    port_b = free_port()
    reg_a = _registry(group, "reg-a", etcd_endpoint, etcd_prefix, free_port())
    reg_b = _registry(group, "reg-b", etcd_endpoint, etcd_prefix, port_b)
    for reg in (reg_a, reg_b):
        await _metric_until(reg, "kvroute_registry_route_share_relay_links", 1)
    async with _agents(reg_a.grpc_target), _routers(
            (reg_a.grpc_target, "ra"), (reg_b.grpc_target, "rb")) as (a, b):
        sa, sb = _share(a), _share(b)
        await b.core.decide(RouteRequest("q1", token_ids=LONG))
        await until(lambda: sa.remote.total == 1, what="a hears b")
        # hub B dies without a goodbye: a can no longer hear b's completions, so hub A has
        # it drop b's in-flight request instead of counting it until its timeout
        reg_b.process.kill()
        await until(lambda: sa.remote.total == 0, within_s=10, what="a forgets b's request")
        assert sa.forgotten_total == 1 and sa.live()
        await until(lambda: not sb.live(), what="b falls back to its own counts")
        # B comes back on the same address (a new hub id): b reconnects, A links to it again
        reg_b2 = _registry(group, "reg-b", etcd_endpoint, etcd_prefix, port_b)
        await _metric_until(reg_a, "kvroute_registry_route_share_relay_links", 1)
        await _metric_until(reg_b2, "kvroute_registry_route_share_relay_links", 1)
        await until(sb.live, what="b shares again")
        # lossless: b re-announced its request in flight (its snapshot through the new hub)
        await until(lambda: sa.remote.total == 1, what="a counts b's q1 again")
        d = await a.core.decide(RouteRequest("q2", token_ids=list(range(5000, 5064))))
        await until(lambda: sb.remote.inflight(d.node_id) == 1, what="b hears a again")
        await b.core.decide(RouteRequest("q3", token_ids=list(range(8000, 8064))))
        await until(lambda: sa.remote.total == 2, what="a hears b again")
        assert a.core.complete("q2") and b.core.complete("q3") and b.core.complete("q1")
        await until(lambda: sa.remote.total == 0 and sb.remote.total == 0,
                     what="completions after the restart")
        # a graceful stop withdraws the hub: A closes its link at once
        reg_b2.stop()
        await _metric_until(reg_a, "kvroute_registry_route_share_relay_peers", 0)


async def test_relay_with_auth_required(etcd_endpoint: str, etcd_prefix: str,
                                        group: ServerGroup, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("registry:kvroute-registry hub-secret\nreader:router router-secret\n"
                      "agent:n1 a1\nagent:n2 a2\nagent:n3 a3\nadmin:ops ops-secret\n")
    hub_token = tmp_path / "hub.token"
    hub_token.write_text("hub-secret\n")
    router_token = tmp_path / "router.token"
    router_token.write_text("router-secret\n")
    auth = ["--auth", "required", "--auth-tokens-file", str(tokens),
            "--share-relay-token-file", str(hub_token)]
    reg_a = _registry(group, "reg-a", etcd_endpoint, etcd_prefix, free_port(), *auth)
    reg_b = _registry(group, "reg-b", etcd_endpoint, etcd_prefix, free_port(), *auth)
    for reg in (reg_a, reg_b):
        await _metric_until(reg, "kvroute_registry_route_share_relay_links", 1)
    # a router (reader) may join, but not as a relay hub: it could speak for other replicas
    async with open_channel(reg_a.grpc_target, TLSSettings(token="router-secret")) as ch:
        async def hello() -> AsyncIterator[rs.RouteShareMessage]:
            yield rs.RouteShareMessage(hello=rs.RouteShareHello(replica_id="x", relay=True,
                                                                hub_id="fake"))
            await asyncio.sleep(5)
        call = rs_grpc.RouteShareStub(ch).Exchange(hello(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "registry:<name> or admin" in (err.value.details() or "")
    async with _agents(reg_a.grpc_target, TLSSettings(token="ops-secret")), _routers(
            (reg_a.grpc_target, "ra"), (reg_b.grpc_target, "rb"),
            client_token_file=str(router_token)) as (a, b):
        d = await a.core.decide(RouteRequest("q1", token_ids=LONG))
        await until(lambda: _share(b).remote.inflight(d.node_id) == 1, what="relayed")
        assert a.core.complete("q1")
        await until(lambda: _share(b).remote.total == 0, what="complete relayed")


async def test_hub_directory_on_etcd(etcd_endpoint: str, etcd_prefix: str) -> None:
    async with EtcdClient(EtcdSettings(etcd_endpoints=(etcd_endpoint,),
                                       etcd_prefix=etcd_prefix)) as client:
        one = EtcdHubDirectory(client, etcd_prefix.encode())
        two = EtcdHubDirectory(client, etcd_prefix.encode())
        seen: list[dict[str, HubRecord]] = []

        async def follow() -> None:
            async for hubs in one.follow():
                seen.append(hubs)
        task = asyncio.create_task(follow())
        try:
            await one.advertise(HubRecord("h1", "reg-1", "127.0.0.1:1"), ttl_s=2)
            await two.advertise(HubRecord("h2", "reg-2", "127.0.0.1:2"), ttl_s=2)
            await until(lambda: bool(seen) and set(seen[-1]) == {"h1", "h2"}, what="both")
            assert seen[-1]["h2"].address == "127.0.0.1:2"
            await two.withdraw()  # graceful: gone at once
            await until(lambda: set(seen[-1]) == {"h1"}, within_s=1.5, what="withdrawn")
            await asyncio.sleep(3)  # h1's lease is kept alive past its TTL
            assert set(seen[-1]) == {"h1"}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await one.withdraw()


async def test_relay_over_mtls_with_a_registry_identity(
        etcd_endpoint: str, etcd_prefix: str, group: ServerGroup, tmp_path: Path) -> None:
    """Registries serving mTLS with --auth required relay with a registry: certificate, dial
    peers by address and expect the name their certificates carry (--share-relay-server-name)."""
    ca = CertAuthority(tmp_path / "pki")
    srv = ca.server()  # DNS:localhost only: dialling 127.0.0.1 needs the name override
    hub = ca.client("registry", "kvroute-registry")
    tls = ["--auth", "required", "--tls-cert-file", str(srv.cert), "--tls-key-file",
           str(srv.key), "--tls-ca-file", str(ca.ca_file), "--share-relay-cert-file",
           str(hub.cert), "--share-relay-key-file", str(hub.key),
           "--share-relay-server-name", "localhost"]
    reg_a = _registry(group, "reg-a", etcd_endpoint, etcd_prefix, free_port(), *tls)
    reg_b = _registry(group, "reg-b", etcd_endpoint, etcd_prefix, free_port(), *tls)
    for reg in (reg_a, reg_b):
        await _metric_until(reg, "kvroute_registry_route_share_relay_links", 1)
    admin, reader = ca.client("admin", "ops"), ca.client("reader", "router")
    agent_tls = TLSSettings(cert_file=str(admin.cert), key_file=str(admin.key),
                            ca_file=str(ca.ca_file), server_name="localhost")
    async with _agents(reg_a.grpc_target, agent_tls), _routers(
            (reg_a.grpc_target, "ra"), (reg_b.grpc_target, "rb"),
            client_tls_ca_file=str(ca.ca_file), client_tls_cert_file=str(reader.cert),
            client_tls_key_file=str(reader.key), client_tls_server_name="localhost") as (a, b):
        d = await b.core.decide(RouteRequest("q1", token_ids=LONG))
        await until(lambda: _share(a).remote.inflight(d.node_id) == 1, what="relayed")
        assert b.core.complete("q1")
        await until(lambda: _share(a).remote.total == 0, what="complete relayed")


async def test_relay_survives_an_etcd_restart(own_etcd: EmbeddedEtcd, etcd_prefix: str,
                                              group: ServerGroup) -> None:
    """etcd restarting under the hubs: the relay links (registry to registry) keep working,
    and afterwards the directory is followed and advertised again (a new hub is linked)."""
    ep = own_etcd.endpoint
    reg_a = _registry(group, "reg-a", ep, etcd_prefix, free_port())
    reg_b = _registry(group, "reg-b", ep, etcd_prefix, free_port())
    for reg in (reg_a, reg_b):
        await _metric_until(reg, "kvroute_registry_route_share_relay_links", 1)
    async with _agents(reg_a.grpc_target), _routers(
            (reg_a.grpc_target, "ra"), (reg_b.grpc_target, "rb")) as (a, b):
        await asyncio.to_thread(own_etcd.restart)
        d = await a.core.decide(RouteRequest("q1", token_ids=LONG))
        await until(lambda: _share(b).remote.inflight(d.node_id) == 1, what="relayed")
        reg_c = _registry(group, "reg-c", ep, etcd_prefix, free_port())
        for reg in (reg_a, reg_b, reg_c):
            await _metric_until(reg, "kvroute_registry_route_share_relay_links", 2, 30)
        assert a.core.complete("q1")
        await until(lambda: _share(b).remote.total == 0, what="complete relayed")
