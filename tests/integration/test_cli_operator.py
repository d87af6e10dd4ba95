"""The operator CLI against real registry and router processes (memory store, real gRPC).

Each case of issue 20 has a test here: route completes what it routed, stats and complete exist,
the wrong service / a missing port / a closed pipe / a mistyped flag give a message a person can
act on, client flags read KVROUTE_* variables, and a router that cannot reach its registry says
so in its log at once and in its gRPC health.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvroute.procs import free_port
from kvroute.v1 import registry_pb2, registry_pb2_grpc
from tests.harness import ServerProcess, running_server, start_server

pytestmark = pytest.mark.integration

BS = 16
TOKENS = ",".join(str(i) for i in range(1, 3 * BS + 1))


def kvroute(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            ) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a subprocess (clean KVROUTE_* environment + ``env``)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False)


def register(target: str, node: str = "n1", model: str = "m") -> None:
    """Register one node with a few blocks, as an agent would (real RegisterNode/Heartbeat)."""
    with grpc.insecure_channel(target) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)
        r = stub.RegisterNode(registry_pb2.RegisterNodeRequest(
            node_id=node, address=f"{node}.local:8000", model=model, block_size=BS,
            capacity_blocks=1000), timeout=5)
        stub.Heartbeat(registry_pb2.HeartbeatRequest(node_id=node, epoch=r.epoch, delta_seq=1,
                                                     write_token=r.write_token), timeout=5)


def wait_for(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess,
                                                                      ServerProcess]]:
    """A memory registry with one node, and a router following it.

    The node is registered once and never heartbeats: its lease runs an hour (the registry
    calls a node late after 2 x TTL/3 + 2 s; with 120 s that was 82 s, and ~30 CLI runs of
    a few seconds each on a loaded machine outlast it: the router then knew no healthy node)."""
    work = tmp_path_factory.mktemp("cli")
    with running_server("registry", ["--store", "memory", "--lease-ttl-s", "3600",
                                     "--block-size", str(BS)], work) as reg:
        register(reg.grpc_target)
        with running_server("router", ["--registry", reg.grpc_target, "--block-size", str(BS),
                                       "--registry-retry-max-s", "0.5"], work) as router:
            wait_for(lambda: kvroute("health", "--server", router.grpc_target).returncode == 0,
                     30, "router SERVING")
            yield reg, router


def stats(router: ServerProcess) -> dict[str, object]:
    out = kvroute("stats", "--router", router.grpc_target, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def inflight(router: ServerProcess) -> int:
    return sum(stats(router)["inflight_by_node"].values())  # type: ignore[attr-defined]


def test_route_completes_what_it_routed(stack: tuple[ServerProcess, ServerProcess]) -> None:
    _, router = stack
    before = inflight(router)
    for _ in range(3):
        out = kvroute("route", "--router", router.grpc_target, "--tokens", TOKENS)
        assert out.returncode == 0, out.stderr
        assert "node:     n1" in out.stdout and "released:" in out.stdout
    assert inflight(router) == before  # 3 probes leave nothing in flight
    out = kvroute("route", "--router", router.grpc_target, "--tokens", TOKENS, "--json")
    assert json.loads(out.stdout)["released"] is True
    # --keep-inflight leaves it for `kvroute complete`, which releases it (and only once).
    out = kvroute("route", "--router", router.grpc_target, "--tokens", TOKENS,
                  "--request-id", "keep-1", "--keep-inflight")
    assert out.returncode == 0 and "kvroute complete" in out.stdout, out.stderr
    assert inflight(router) == before + 1
    done = kvroute("complete", "--router", router.grpc_target, "--request-id", "keep-1",
                   "--cached-tokens", "16")
    assert done.returncode == 0 and "released: keep-1" in done.stdout, done.stderr
    assert inflight(router) == before
    again = kvroute("complete", "--router", router.grpc_target, "--request-id", "keep-1")
    assert again.returncode == 1 and "was not in flight" in again.stderr
    assert int(stats(router)["reported_cached_tokens"]) >= 16  # type: ignore[call-overload]


def test_stats_and_health_commands(stack: tuple[ServerProcess, ServerProcess]) -> None:
    reg, router = stack
    out = kvroute("stats", "--router", router.grpc_target)
    assert out.returncode == 0, out.stderr
    assert "registry:   connected; 1 node(s) known" in out.stdout
    assert "decisions:" in out.stdout and "cached tokens: predicted" in out.stdout
    for target in (reg.grpc_target, router.grpc_target):
        ok = kvroute("health", "--server", target)
        assert ok.returncode == 0 and ok.stdout.strip() == f"{target}: SERVING", ok.stderr
    ok = kvroute("health", "--server", router.grpc_target, "--service", "liveness", "--quiet")
    assert ok.returncode == 0 and ok.stdout == ""
    unknown = kvroute("health", "--server", reg.grpc_target, "--service", "nope")
    assert unknown.returncode == 1 and "UNKNOWN service 'nope'" in unknown.stderr


def test_wrong_service_is_named(stack: tuple[ServerProcess, ServerProcess]) -> None:
    reg, router = stack
    out = kvroute("route", "--router", reg.grpc_target, "--tokens", TOKENS)
    assert out.returncode == 1
    assert "Method not found" not in out.stderr
    assert f"{reg.grpc_target} is not a kvroute router" in out.stderr
    assert f"It is a kvroute registry (talk to it with: kvroute nodes --registry " \
           f"{reg.grpc_target})" in out.stderr
    out = kvroute("nodes", "--registry", router.grpc_target)
    assert out.returncode == 1
    assert f"{router.grpc_target} is not a kvroute registry" in out.stderr
    assert "It is a kvroute router" in out.stderr
    for cmd in ("stats", "complete"):
        extra = ["--request-id", "x"] if cmd == "complete" else []
        out = kvroute(cmd, "--router", reg.grpc_target, *extra)
        assert out.returncode == 1 and "is not a kvroute router" in out.stderr, out.stderr


@pytest.mark.parametrize("cmd,flag", [("route", "--router"), ("nodes", "--registry"),
                                      ("stats", "--router"), ("health", "--server"),
                                      ("complete", "--router")])
def test_missing_port_is_an_error_not_port_443(cmd: str, flag: str) -> None:
    extra = {"route": ["--tokens", "1"], "complete": ["--request-id", "x"]}.get(cmd, [])
    out = kvroute(cmd, flag, "localhost", *extra)
    assert out.returncode == 2
    assert f"kvroute {cmd}: configuration error: {flag}: expected HOST:PORT, got " \
           "'localhost': the port is required" in out.stderr
    assert "443" in out.stderr


def test_unreachable_server_names_address_and_tls_flags() -> None:
    port = free_port()
    out = kvroute("nodes", "--registry", f"127.0.0.1:{port}", "--timeout", "2")
    assert out.returncode == 1
    assert f"cannot reach 127.0.0.1:{port} (--registry): UNAVAILABLE" in out.stderr
    assert "--tls-ca-file" in out.stderr
    down = kvroute("health", "--server", f"127.0.0.1:{port}", "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_broken_pipe_exits_quietly(tmp_path: Path) -> None:
    with running_server("registry", ["--store", "memory", "--lease-ttl-s", "120"],
                        tmp_path) as reg:
        with grpc.insecure_channel(reg.grpc_target) as ch:
            stub = registry_pb2_grpc.RegistryStub(ch)
            for i in range(300):  # ~130 kB of JSON: more than a pipe buffers
                stub.RegisterNode(registry_pb2.RegisterNodeRequest(
                    node_id=f"pipe-{i:03d}-" + "x" * 100, address=f"10.0.0.{i % 250}:8000",
                    model="m", block_size=BS, capacity_blocks=1000), timeout=5)
        base = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "nodes", "--registry",
                                 reg.grpc_target, "--json"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=base)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(10)  # `| head -c 10`
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141
        assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_mistyped_flag_under_serve_names_the_role_and_the_flag() -> None:
    out = kvroute("serve", "router", "--registy", "127.0.0.1:50051")
    assert out.returncode == 2
    assert out.stderr.startswith("kvroute serve router: error: unrecognized arguments: "
                                 "--registy (did you mean --registry?)"), out.stderr
    assert "Run 'kvroute serve router --help'" in out.stderr
    assert "usage: kvroute [-h]" not in out.stderr
    out = kvroute("nodes", "--registry", "127.0.0.1:1", "--jsn")
    assert out.returncode == 2 and "--jsn (did you mean --json?)" in out.stderr


def test_client_flags_read_kvroute_variables(stack: tuple[ServerProcess, ServerProcess]) -> None:
    reg, router = stack
    env = {"KVROUTE_ROUTER": router.grpc_target, "KVROUTE_REGISTRY": reg.grpc_target,
           "KVROUTE_JSON": "true", "KVROUTE_TIMEOUT": "7"}
    out = kvroute("route", "--tokens", TOKENS, env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["node_id"] == "n1", out.stderr
    out = kvroute("nodes", env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["nodes"], out.stderr
    out = kvroute("stats", env=env)
    assert out.returncode == 0 and "nodes_known" in json.loads(out.stdout), out.stderr
    # A flag on the command line wins over its variable.
    out = kvroute("stats", "--router", "127.0.0.1:1", "--timeout", "2",
                  env={**env, "KVROUTE_JSON": "0"})
    assert out.returncode == 1 and "cannot reach 127.0.0.1:1" in out.stderr
    out = kvroute("health", env={"KVROUTE_SERVER": router.grpc_target})
    assert out.returncode == 0, out.stderr


def test_router_without_its_registry_logs_at_once_and_is_not_serving(tmp_path: Path) -> None:
    port = free_port()
    router = start_server("router", ["--registry", f"127.0.0.1:{port}", "--block-size",
                                     str(BS), "--registry-retry-max-s", "0.5"], tmp_path)
    try:
        log = tmp_path / "router.log"
        wait_for(lambda: f"cannot reach the registry at 127.0.0.1:{port}" in log.read_text(),
                 5, "the registry failure in the router's log")
        assert "UNAVAILABLE" in log.read_text()
        out = kvroute("health", "--server", router.grpc_target)
        assert out.returncode == 1
        assert "NOT_SERVING (the router's link to its registry is DOWN" in out.stderr, out.stderr
        live = kvroute("health", "--server", router.grpc_target, "--service", "liveness")
        assert live.returncode == 0, live.stderr
        route = kvroute("route", "--router", router.grpc_target, "--tokens", TOKENS)
        assert route.returncode == 1
        assert "UNAVAILABLE: the router cannot reach its registry" in route.stderr, route.stderr
        assert "no node is registered" not in route.stderr
        assert "The router's link to its registry is DOWN" in route.stderr, route.stderr
        # The registry comes up on that address and a node registers: SERVING, and it stays so.
        with running_server("registry", ["--store", "memory", "--listen", f"127.0.0.1:{port}",
                                         "--block-size", str(BS)], tmp_path) as reg:
            register(reg.grpc_target)
            wait_for(lambda: kvroute("health", "--server", router.grpc_target).returncode == 0,
                     20, "router SERVING once a node is known")
            assert "reachable again" in log.read_text()
    finally:
        assert router.stop() == 0
