"""The dev overlay's configuration forms a working fleet when run as real processes.

Every kvroute container of ``k8s/overlays/dev`` (registry, router, one engine-sim pod with its
agent sidecar) is started with exactly the environment and args the rendered manifests give it.
Only addresses are rewritten: cluster names and pod IPs become 127.0.0.1, each fixed port
becomes a free port (the same mapping everywhere, so sidecar wiring stays as written), and etcd
is the test etcd. Then a completion on the engine must show up as cached blocks in a Route
decision: KV events (topic, endpoints) -> agent -> registry -> router, all as configured.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from kvroute.procs import free_port
from kvroute.settings import ENV_PREFIX
from kvroute.v1 import registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc
from tests.harness import ServerProcess, running_server
from tests.unit.test_k8s_manifests import FIELD_VALUES, K8S, Container, containers, render

pytestmark = pytest.mark.integration

T = TypeVar("T")

CLUSTER_HOSTS = ("0.0.0.0", "kvroute-registry", FIELD_VALUES["status.podIP"])


class Localizer:
    """Rewrites cluster addresses to loopback, mapping each fixed port to one free port."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}

    def port(self, port: int) -> int:
        if port not in self.ports:
            self.ports[port] = free_port()
        return self.ports[port]

    def value(self, value: str) -> str:
        for host in CLUSTER_HOSTS:
            value = value.replace(host, "127.0.0.1")
        return re.sub(r"127\.0\.0\.1:(\d+)",
                      lambda m: f"127.0.0.1:{self.port(int(m.group(1)))}", value)

    def env(self, c: Container, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update({k: self.value(v) for k, v in c.env.items() if k.startswith(ENV_PREFIX)})
        env.update(overrides)
        return env


def start(stack: ExitStack, c: Container, loc: Localizer, workdir: Path,
          **overrides: str) -> ServerProcess:
    env = loc.env(c, **overrides)
    # The harness would add --listen 127.0.0.1:0; pass the manifest's (localized) values.
    args = ["--listen", env.pop("KVROUTE_LISTEN"),
            "--metrics-listen", env.pop("KVROUTE_METRICS_LISTEN")]
    role = c.spec["args"][1]
    assert c.spec["args"][2:] == [], "extra args would be passed here too"
    return stack.enter_context(running_server(role, args, workdir, name=c.spec["name"], env=env))


def poll(what: str, check: Callable[[], T | None], timeout_s: float = 20.0) -> T:
    """Call ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


@pytest.fixture
def dev_fleet(tmp_path: Path, etcd_endpoint: str, etcd_prefix: str,
              ) -> Iterator[dict[str, object]]:
    found = {c.spec["name"]: c for c in containers(render(K8S / "overlays" / "dev"))
             if c.role is not None}
    loc = Localizer()
    with ExitStack() as stack:
        registry = start(stack, found["registry"], loc, tmp_path,
                         KVROUTE_ETCD_ENDPOINTS=etcd_endpoint, KVROUTE_ETCD_PREFIX=etcd_prefix)
        router = start(stack, found["router"], loc, tmp_path)
        engine = start(stack, found["engine"], loc, tmp_path)
        agent = start(stack, found["node-agent"], loc, tmp_path)
        yield {"registry": registry, "router": router, "engine": engine, "agent": agent,
               "loc": loc, "agent_env": loc.env(found["node-agent"])}


def test_dev_overlay_config_routes_to_cached_blocks(dev_fleet: dict[str, object]) -> None:
    loc: Localizer = dev_fleet["loc"]  # type: ignore[assignment]
    agent_env: dict[str, str] = dev_fleet["agent_env"]  # type: ignore[assignment]
    node_id, engine_url = agent_env["KVROUTE_NODE_ID"], agent_env["KVROUTE_ENGINE_URL"]
    registry_target = f"127.0.0.1:{loc.ports[50051]}"
    router_target = f"127.0.0.1:{loc.ports[50052]}"

    with grpc.insecure_channel(registry_target) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)

        def registered() -> list[registry_pb2.NodeInfo]:
            nodes = stub.ListNodes(registry_pb2.ListNodesRequest(), timeout=2).nodes
            return [n for n in nodes if n.node_id == node_id]

        (node,) = poll("the agent to register its engine", registered)
    assert node.address == engine_url and node.model == agent_env["KVROUTE_MODEL"]

    tokens = list(range(1, 65))  # 4 blocks of 16
    body = json.dumps({"model": agent_env["KVROUTE_MODEL"], "prompt": tokens,
                       "max_tokens": 1}).encode()
    req = urllib.request.Request(f"{engine_url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200

    with grpc.insecure_channel(router_target) as ch:
        route = router_pb2_grpc.RouterStub(ch).Route

        def cached() -> router_pb2.RouteResponse | None:
            r = route(router_pb2.RouteRequest(request_id="k8s-dev", token_ids=tokens + [99] * 16,
                                              model=agent_env["KVROUTE_MODEL"]), timeout=2)
            return r if r.matched_blocks >= 4 else None

        decision = poll("the router to see the engine's cached blocks", cached)
    assert decision.node_id == node_id and decision.address == engine_url
    assert not decision.degraded
