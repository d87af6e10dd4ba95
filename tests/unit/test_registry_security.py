"""Registry security parts on their own: identities, tokens, the write-limit buckets, the raw
message peek, index limits and write tokens over real gRPC (in-process server, memory store)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvroute.blocks import HASH_SCHEME
from kvroute.errors import ConfigError, PermissionDenied, ResourceExhausted, Unauthenticated
from kvroute.procs import free_port
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from registry_service.auth import Authenticator, Identity, parse_tokens_file, token_digest
from registry_service.guard import ClientLimiter
from registry_service.peek import node_id_of, peek
from registry_service.security_settings import SecuritySettings
from registry_service.server import serve
from registry_service.settings import RegistrySettings

Code = grpc.StatusCode


def test_identity_from_token_and_certificate() -> None:
    auth = Authenticator(SecuritySettings(auth="required",
                                          auth_tokens=("agent:n1=s3cret", "reader:gw=r")))
    assert auth.identify({"authorization": "Bearer s3cret"}, {}) == Identity("agent", "n1",
                                                                            "token")
    ident = auth.identify({}, {"peer_uri": [b"spiffe://kvroute/reader/router-0"],
                               "x509_pem_cert": [b"x"]})
    assert ident == Identity("reader", "router-0", "client certificate")
    with pytest.raises(Unauthenticated, match="not known"):
        auth.identify({"authorization": "Bearer nope"}, {})
    with pytest.raises(Unauthenticated, match="Bearer"):
        auth.identify({"authorization": "Basic abc"}, {})
    with pytest.raises(Unauthenticated, match="spiffe://kvroute/other/x"):
        auth.identify({}, {"peer_uri": [b"spiffe://kvroute/other/x"], "x509_pem_cert": [b"x"]})
    with pytest.raises(Unauthenticated, match="requires credentials"):
        auth.identify({}, {})
    # auth none: everyone is anonymous and may do everything
    open_auth = Authenticator(SecuritySettings())
    assert open_auth.identify({}, {}).role == "anonymous"


def test_who_may_do_what() -> None:
    agent, reader = Identity("agent", "n1", "t"), Identity("reader", "gw", "t")
    admin = Identity("admin", "ops", "t")
    Authenticator.authorize(agent, "Heartbeat", "n1")
    Authenticator.authorize(reader, "WatchPlacement")
    Authenticator.authorize(admin, "DeregisterNode", "n9")
    with pytest.raises(PermissionDenied, match=r"agent:n1.*only call.*'n1'"):
        Authenticator.authorize(agent, "RegisterNode", "n2")
    with pytest.raises(PermissionDenied, match="agent:n1"):
        Authenticator.authorize(agent, "Lookup")
    with pytest.raises(PermissionDenied, match=r"reader:gw.*Lookup"):
        Authenticator.authorize(reader, "Resync", "n1")


def test_tokens_file_format(tmp_path: Path) -> None:
    lines = ["# comment", "agent:n1 tok1", f"reader:r sha256:{token_digest('tok2')}", ""]
    table = parse_tokens_file(lines, "f")
    assert table[token_digest("tok1")] == Identity("agent", "n1", "token")
    assert table[token_digest("tok2")].role == "reader"
    for bad in (["agent:n1"], ["root:x tok"], ["agent:n1 sha256:abc"]):
        with pytest.raises(ValueError):
            parse_tokens_file(bad, "f")
    with pytest.raises(ConfigError, match="auth-tokens"):
        SecuritySettings(auth_tokens=("nobody=x",))
    with pytest.raises(ConfigError, match="--auth"):
        RegistrySettings(auth="required")  # neither client certificates nor tokens


def test_client_limiter_calls_and_byte_debt() -> None:
    now = [0.0]
    lim = ClientLimiter(calls_per_s=2, burst=2, bytes_per_s=1000, clock=lambda: now[0])
    big = 100_000  # over SMALL_MESSAGE_BYTES
    lim.call("c", "Heartbeat")
    lim.call("c", "Heartbeat")
    with pytest.raises(ResourceExhausted, match="2 calls/s"):
        lim.call("c", "Heartbeat")
    lim.call("other", "Heartbeat")  # per client
    now[0] = 0.5
    lim.call("c", "Heartbeat")
    lim.payload("c", "Resync", big)  # not in debt: admitted whatever its size
    with pytest.raises(ResourceExhausted, match="bytes/s"):
        lim.payload("c", "Resync", big)
    lim.payload("c", "Heartbeat", 100)  # a small message always passes (lease refresh)
    now[0] = 0.5 + 99.2  # the debt (99,100 B) paid off at 1000 B/s
    lim.payload("c", "Resync", big)
    burst = ClientLimiter(calls_per_s=2, burst=2, bytes_per_s=1000, bytes_burst=3 * big,
                          clock=lambda: now[0])
    burst.payload("d", "Resync", big)  # a fresh client holds the burst: no debt after one
    burst.payload("d", "Resync", big)


def test_peek_counts_packed_hashes_without_decoding() -> None:
    req = pb.HeartbeatRequest(node_id="node-7", epoch=12345, stored=[1, 2**63, 300] * 1000,
                              removed=[5, 6], delta_seq=3, write_token="t" * 40)
    got = peek(req.SerializeToString(), frozenset({7, 8}))
    assert got is not None and got.node_id == "node-7"
    assert got.counts == {7: 3000, 8: 2}
    rs = pb.ResyncRequest(node_id="n", epoch=1, block_hashes=list(range(70_000)))
    found = peek(rs.SerializeToString(), frozenset({3}))
    assert found is not None and found.counts == {3: 70_000}
    # 10-byte varints across the 64 KiB chunks the count is made in
    wide = pb.HeartbeatRequest(node_id="w", stored=[2**63 + 7] * 20_000).SerializeToString()
    assert (got := peek(wide, frozenset({7}))) is not None and got.counts == {7: 20_000}
    assert peek(b"\x0a\xff", frozenset({7})) is None  # truncated: decode normally
    assert node_id_of(req.SerializeToString()) == "node-7"
    assert node_id_of(pb.HeartbeatRequest(epoch=1).SerializeToString()) == ""


@contextlib.asynccontextmanager
async def registry(tmp_path: Path, **settings: Any) -> AsyncIterator[str]:
    """An in-process registry (memory store) on a free port; yields its target."""
    ready = tmp_path / "ready.json"
    stop = asyncio.Event()
    task = asyncio.create_task(serve(RegistrySettings(
        store="memory", listen=f"127.0.0.1:{free_port()}", ready_file=str(ready),
        **settings), stop))
    for _ in range(200):
        if ready.exists():
            break
        await asyncio.sleep(0.02)
    try:
        yield f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}"
    finally:
        stop.set()
        assert await task == 0


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[pb_grpc.RegistryStub]:
    async with registry(tmp_path, lease_ttl_s=30, status_write_interval_s=0,
                        capacity_slack_blocks=10, capacity_slack=0.0,
                        max_blocks_per_node=1000, max_index_entries=150) as target, \
            grpc.aio.insecure_channel(target) as ch:
        yield pb_grpc.RegistryStub(ch)


async def _code(aw: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await aw  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


async def _register(st: pb_grpc.RegistryStub, node: str, cap: int,
                    ) -> pb.RegisterNodeResponse:
    return await st.RegisterNode(pb.RegisterNodeRequest(
        node_id=node, address=f"{node}:1", model="m", block_size=16, capacity_blocks=cap,
        hash_scheme=HASH_SCHEME))


async def _blocks(st: pb_grpc.RegistryStub) -> dict[str, int]:
    nodes = (await st.ListNodes(pb.ListNodesRequest())).nodes
    return {n.node_id: n.blocks_indexed for n in nodes}


async def test_block_limits_refuse_and_leave_the_index_unchanged(
        stub: pb_grpc.RegistryStub) -> None:
    a = await _register(stub, "a", 100)  # limit 110 blocks
    code, msg = await _code(_register(stub, "huge", 5000))
    assert code == Code.FAILED_PRECONDITION and "--max-blocks-per-node 1000" in msg
    hb = pb.HeartbeatRequest(node_id="a", epoch=a.epoch, write_token=a.write_token,
                             stored=range(1, 101), delta_seq=1)
    await stub.Heartbeat(hb)
    # 1,000 more stored hashes: refused from the raw bytes, naming node, limit and count
    code, msg = await _code(stub.Heartbeat(pb.HeartbeatRequest(
        node_id="a", epoch=a.epoch, write_token=a.write_token, stored=range(1000, 2000),
        delta_seq=2)))
    assert code == Code.RESOURCE_EXHAUSTED
    assert "node a" in msg and "1000 blocks" in msg and "110" in msg and "capacity_blocks 100" \
        in msg, msg
    # 20 new + 0 removed on 100 held: the exact count (120) passes the limit (110)
    code, msg = await _code(stub.Heartbeat(pb.HeartbeatRequest(
        node_id="a", epoch=a.epoch, write_token=a.write_token, stored=range(200, 220),
        delta_seq=2)))
    assert code == Code.RESOURCE_EXHAUSTED and "would index 120 blocks" in msg, msg
    # the same with 20 removed fits exactly, and churn at capacity keeps working
    await stub.Heartbeat(pb.HeartbeatRequest(
        node_id="a", epoch=a.epoch, write_token=a.write_token, stored=range(200, 220),
        removed=range(1, 21), delta_seq=2))
    assert await _blocks(stub) == {"a": 100}
    # the total index limit (150 entries)
    b = await _register(stub, "b", 100)
    code, msg = await _code(stub.Heartbeat(pb.HeartbeatRequest(
        node_id="b", epoch=b.epoch, write_token=b.write_token, stored=range(1, 61),
        delta_seq=1)))
    assert code == Code.RESOURCE_EXHAUSTED and "--max-index-entries 150" in msg, msg

    async def resync() -> AsyncIterator[pb.ResyncRequest]:
        yield pb.ResyncRequest(node_id="b", epoch=b.epoch, write_token=b.write_token,
                               block_hashes=range(1, 200))

    code, msg = await _code(stub.Resync(resync()))
    assert code == Code.RESOURCE_EXHAUSTED and "node b" in msg and "110" in msg, msg
    assert await _blocks(stub) == {"a": 100, "b": 0}


async def test_large_refused_writes_are_answered_at_the_refused_bytes_rate(
        tmp_path: Path) -> None:
    """A refused write over 64 KiB is answered after its bytes' time at
    --client-refused-bytes-per-s (at most 3 s, x0.8-1.0 jitter), so a client sending writes
    that cannot succeed one after another makes the registry receive at most that rate of
    them; a small refused write is answered at once."""
    async with registry(tmp_path, lease_ttl_s=30, status_write_interval_s=0,
                        capacity_slack_blocks=10, capacity_slack=0.0,
                        client_refused_bytes_per_s=200_000) as target, \
            grpc.aio.insecure_channel(target) as ch:
        st = pb_grpc.RegistryStub(ch)
        a = await _register(st, "a", 100)  # limit 110 blocks
        big = pb.HeartbeatRequest(node_id="a", epoch=a.epoch, write_token=a.write_token,
                                  stored=range(2**40, 2**40 + 50_000), delta_seq=1)
        small = pb.HeartbeatRequest(node_id="a", epoch=a.epoch, write_token=a.write_token,
                                    stored=range(1, 1000), delta_seq=1)
        nbytes = big.ByteSize()  # ~300 KB: 1.5 s at 200 KB/s
        t0 = time.monotonic()
        code, msg = await _code(st.Heartbeat(big))
        held = time.monotonic() - t0
        assert code == Code.RESOURCE_EXHAUSTED and "capacity_blocks 100" in msg, msg
        assert held >= 0.8 * nbytes / 200_000 - 0.05, (held, nbytes)
        t0 = time.monotonic()
        code, msg = await _code(st.Heartbeat(small))
        assert code == Code.RESOURCE_EXHAUSTED and "999 blocks" in msg, msg
        assert time.monotonic() - t0 < held, "a small refused write is not held"
        assert await _blocks(st) == {"a": 0}


async def test_offloaded_tier_limits(tmp_path: Path) -> None:
    """The offloaded tier is not bounded by GPU capacity, but by --max-blocks-per-node per node
    and --max-index-entries with the device tier; a refused write applies nothing."""
    async with registry(tmp_path, lease_ttl_s=30, status_write_interval_s=0,
                        max_blocks_per_node=300, max_index_entries=400) as target, \
            grpc.aio.insecure_channel(target) as ch:
        st = pb_grpc.RegistryStub(ch)
        a = await _register(st, "a", 100)
        beat = {"node_id": "a", "epoch": a.epoch, "write_token": a.write_token}
        await st.Heartbeat(pb.HeartbeatRequest(**beat, stored=range(1, 51),
                                               stored_offloaded=range(1, 251), delta_seq=1))
        code, msg = await _code(st.Heartbeat(pb.HeartbeatRequest(
            **beat, stored_offloaded=range(1000, 1100), delta_seq=2)))
        assert code == Code.RESOURCE_EXHAUSTED and "offloaded tier would hold 350" in msg, msg
        b = await _register(st, "b", 100)
        code, msg = await _code(st.Heartbeat(pb.HeartbeatRequest(
            node_id="b", epoch=b.epoch, write_token=b.write_token,
            stored_offloaded=range(1, 120), delta_seq=1)))
        assert code == Code.RESOURCE_EXHAUSTED and "--max-index-entries 400" in msg, msg

        async def resync() -> AsyncIterator[pb.ResyncRequest]:
            yield pb.ResyncRequest(node_id="b", epoch=b.epoch, write_token=b.write_token,
                                   offloaded_block_hashes=range(1, 400))

        code, msg = await _code(st.Resync(resync()))
        assert code == Code.RESOURCE_EXHAUSTED and "offloaded tier" in msg, msg
        [na, nb] = (await st.ListNodes(pb.ListNodesRequest())).nodes
        assert (na.blocks_indexed, na.offloaded_blocks_indexed) == (50, 250)
        assert nb.offloaded_blocks_indexed == 0


async def test_write_token_is_required_and_never_shown(stub: pb_grpc.RegistryStub) -> None:
    a = await _register(stub, "a", 100)
    listed = (await stub.ListNodes(pb.ListNodesRequest())).nodes[0]
    assert a.write_token not in str(listed)
    for token in ("", "guess"):
        code, msg = await _code(stub.Heartbeat(pb.HeartbeatRequest(
            node_id="a", epoch=listed.epoch, write_token=token)))
        assert code == Code.PERMISSION_DENIED and "write_token" in msg
    code, _ = await _code(stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="a")))
    assert code == Code.PERMISSION_DENIED

    async def resync() -> AsyncIterator[pb.ResyncRequest]:
        yield pb.ResyncRequest(node_id="a", epoch=a.epoch, block_hashes=[1])

    code, _ = await _code(stub.Resync(resync()))
    assert code == Code.PERMISSION_DENIED
    again = await _register(stub, "a", 100)  # same address: a new epoch and a new token
    assert again.write_token != a.write_token
    code, _ = await _code(stub.DeregisterNode(pb.DeregisterNodeRequest(
        node_id="a", write_token=a.write_token)))
    assert code == Code.PERMISSION_DENIED
    await stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="a",
                                                       write_token=again.write_token))


def test_issue_certs_script_names_the_identity_the_registry_expects(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    x509 = pytest.importorskip("cryptography.x509")
    script = Path(__file__).resolve().parents[2] / "scripts" / "issue_certs.sh"
    env = {**os.environ, "OUT": str(tmp_path)}
    for args in (["ca"], ["agent", "node-3"], ["reader", "router"],
                 ["server", "kvroute-registry", "kvroute-registry", "registry/kvroute-registry"]):
        subprocess.run(["bash", str(script), *args], env=env, check=True, capture_output=True)
    auth = Authenticator(SecuritySettings(auth="required"))
    for name, want in (("agent-node-3", Identity("agent", "node-3", "client certificate")),
                       ("reader-router", Identity("reader", "router", "client certificate")),
                       ("kvroute-registry",  # its RouteShare relay identity (issue 19)
                        Identity("registry", "kvroute-registry", "client certificate"))):
        cert = x509.load_pem_x509_certificate((tmp_path / f"{name}.crt").read_bytes())
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        got = auth.identify({}, {"peer_uri": [u.encode() for u in uris],
                                 "x509_pem_cert": [b"x"]})
        assert got == want


async def test_read_methods_under_auth(tmp_path: Path) -> None:
    """Every read shape (unary, server stream, bidirectional stream) is checked once per call;
    health stays open for probes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvroute.grpcutil import open_channel
    from kvroute.settings import TLSSettings

    async with registry(tmp_path, auth="required",
                        auth_tokens=("reader:gw=rtok", "agent:n1=atok")) as target:
        async with open_channel(target, TLSSettings(token="atok")) as ach:
            agent = pb_grpc.RegistryStub(ach)
            a = await agent.RegisterNode(pb.RegisterNodeRequest(
                node_id="n1", address="n1:1", model="m", block_size=16, capacity_blocks=10,
                hash_scheme=HASH_SCHEME))
            await agent.Heartbeat(pb.HeartbeatRequest(node_id="n1", epoch=a.epoch,
                                                      write_token=a.write_token, stored=[5],
                                                      delta_seq=1))
            code, _ = await _code(agent.Lookup(pb.LookupRequest(block_hashes=[5])))
            assert code == Code.PERMISSION_DENIED
            watch = agent.WatchNodes(pb.WatchNodesRequest())
            code, _ = await _code(watch.read())
            assert code == Code.PERMISSION_DENIED
        async with open_channel(target, TLSSettings(token="rtok")) as rch:
            reader = pb_grpc.RegistryStub(rch)
            got = await reader.Lookup(pb.LookupRequest(block_hashes=[5], model="m"))
            assert [(n.node_id, n.matched_blocks) for n in got.nodes] == [("n1", 1)]

            async def reqs() -> AsyncIterator[pb.LookupRequest]:
                yield pb.LookupRequest(request_id="x", block_hashes=[5], model="m")

            replies = [r async for r in reader.LookupStream(reqs())]
            assert replies[0].nodes[0].matched_blocks == 1
            first = await reader.WatchNodes(pb.WatchNodesRequest()).read()
            assert first.type == pb.NodeEvent.SNAPSHOT
        async with grpc.aio.insecure_channel(target) as anon:
            health = await health_pb2_grpc.HealthStub(anon).Check(
                health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            code, _ = await _code(pb_grpc.RegistryStub(anon).LookupStream(reqs()).read())
            assert code == Code.UNAUTHENTICATED


def test_a_registry_identity_may_only_join_route_share() -> None:
    """Issue 19: registry replicas relay router replicas' deltas to one another as
    ``registry:<name>``; that identity reads and writes nothing else."""
    ident = parse_tokens_file(["registry:kvroute-registry hub-secret"], "t")[
        token_digest("hub-secret")]
    assert ident.role == "registry"
    Authenticator.authorize(ident, "Exchange")
    for method in ("Lookup", "ListNodes", "RegisterNode", "Heartbeat"):
        with pytest.raises(PermissionDenied, match=r"only call RouteShare\.Exchange"):
            Authenticator.authorize(ident, method, "n1")
