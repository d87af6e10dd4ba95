"""kvroute.client against real registry and router processes: the README examples run as they
are; failover across addresses; retries end within the deadline; errors are typed."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import grpc
import pytest

from kvroute.blocks import hash_blocks
from kvroute.client import AsyncRouterClient, ClientOptions, RegistryClient, RouterClient
from kvroute.errors import InvalidArgument, Unavailable
from kvroute.procs import free_port
from kvroute.v1 import registry_pb2, registry_pb2_grpc
from tests.harness import ServerProcess, start_server

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "kvroute" / "client" / "README.md"


@pytest.fixture(scope="module")
def services(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory,
             ) -> tuple[ServerProcess, ServerProcess]:
    work = tmp_path_factory.mktemp("client")
    # n1 is registered once and never heartbeats: an hour's lease (with 30 s it turned late,
    # unhealthy, after 22 s, which a loaded machine's slow module could outlast)
    reg = start_server("registry", ["--etcd-endpoints", etcd_endpoint, "--etcd-prefix",
                                    f"/kvroute-test/client-{free_port()}/", "--lease-ttl-s",
                                    "3600"], work, name="registry")
    router = start_server("router", ["--registry", reg.grpc_target], work, name="router")
    with grpc.insecure_channel(reg.grpc_target) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)
        r = stub.RegisterNode(registry_pb2.RegisterNodeRequest(
            node_id="n1", address="127.0.0.1:9", model="sim-model", block_size=16,
            capacity_blocks=100), timeout=5)
        stub.Heartbeat(registry_pb2.HeartbeatRequest(
            node_id="n1", epoch=r.epoch, stored=hash_blocks(list(range(1000, 1064)), 16),
            delta_seq=1, write_token=r.write_token), timeout=5)
    yield reg, router
    router.stop()
    reg.stop()


def test_readme_examples_run(services: tuple[ServerProcess, ServerProcess],
                             monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    reg, router = services
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("KVROUTE_REGISTRIES", f"{dead},{reg.grpc_target}")
    monkeypatch.setenv("KVROUTE_ROUTERS", router.grpc_target)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2
    deadline = time.monotonic() + 10
    while True:  # the router's replica may still be syncing right after start
        try:
            exec(compile(blocks[0], "README block 1", "exec"), {})
            break
        except Unavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    exec(compile(blocks[1], "README block 2", "exec"), {})
    out = capsys.readouterr().out
    assert "n1 127.0.0.1:9 healthy" in out
    assert re.search(r"n1 127\.0\.0\.1:9 (\d+) kv_aware", out)  # expected cached tokens


def test_failover_retry_deadline_and_typed_errors(
        services: tuple[ServerProcess, ServerProcess]) -> None:
    _, router = services
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    with RouterClient(ClientOptions(targets=[*dead, router.grpc_target], attempts=3,
                                    timeout_s=1, backoff_initial_s=0.01)) as c:
        assert c.route("f1", token_ids=[1] * 32, model="sim-model").node_id == "n1"
        with pytest.raises(InvalidArgument, match="request_id") as info:
            c.route("", token_ids=[1] * 32)
        assert "1 attempt" in str(info.value)  # not retried
    t0 = time.monotonic()
    with RegistryClient(ClientOptions(targets=dead, attempts=10, timeout_s=0.2,
                                      total_timeout_s=1.0, backoff_max_s=0.2)) as r, \
            pytest.raises(Unavailable):
        r.list_nodes()
    assert time.monotonic() - t0 < 2.5  # the call deadline bounds all attempts
    with pytest.raises(ValueError, match="targets"):
        ClientOptions(targets=["nohost"])


async def test_async_client(services: tuple[ServerProcess, ServerProcess]) -> None:
    _, router = services
    async with AsyncRouterClient(ClientOptions(targets=[f"127.0.0.1:{free_port()}",
                                                        router.grpc_target])) as c:
        route = await c.route("a1", token_ids=list(range(1000, 1064)), model="sim-model")
        assert route.expected_cached_tokens > 0  # the engine always computes the last block
        assert (await c.stats()).inflight_by_node["n1"] >= 1
        assert await c.complete("a1", cached_tokens=64)
        assert not await c.complete("a1")
    assert os.environ.get("KVROUTE_ROUTERS") is None


def test_registry_lookup_every_node_or_only_the_matching_ones(
        services: tuple[ServerProcess, ServerProcess]) -> None:
    reg, _ = services
    held = hash_blocks(list(range(1000, 1064)), 16)
    with RegistryClient(ClientOptions(targets=[reg.grpc_target])) as r:
        assert r.lookup(held, "sim-model") == {"n1": 4}
        assert r.lookup(held, "sim-model", matched_only=True) == {"n1": 4}
        assert r.lookup([1, 2, 3], "sim-model") == {"n1": 0}  # every node, matched or not
        assert r.lookup([1, 2, 3], "sim-model", matched_only=True) == {}
