"""The overlays' configuration forms a working fleet when run as real processes.

Every kvroute container of an overlay (registry, router, one inference pod's node agent) is
started with exactly the environment and args the rendered manifests give it. Only what a
cluster provides is simulated:
- cluster names and pod IPs become 127.0.0.1; each fixed port becomes one free port (the same
  mapping everywhere, so the sidecar wiring stays as written); etcd is the test etcd;
- Secret mounts become temp dirs with certificates made by openssl as k8s/README.md describes
  (the per-pod agent certificate that the cert-manager CSI driver would issue becomes the
  kvroute-agent-tls dir, with the pod's URI SAN),
  and DNS (the TLS server name a client derives from ``kvroute-registry:50051``) becomes a
  server-name override, since 127.0.0.1 is what the client dials;
- the production fleet serves vLLM, which cannot run here: engine_sim from the dev overlay
  stands in on vLLM's ports, topic and model.
Then a completion on the engine must show up as cached blocks in a Route decision: KV events
-> agent -> registry -> router, all as configured.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from kvroute.procs import free_port
from kvroute.settings import ENV_PREFIX
from kvroute.v1 import registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc
from tests.harness import running_server
from tests.unit.test_k8s_manifests import FIELD_VALUES, K8S, Container, containers, render
from tests.unit.test_k8s_tls_probe import make_certs

pytestmark = pytest.mark.integration

T = TypeVar("T")

CLUSTER_HOSTS = ("0.0.0.0", "kvroute-registry", FIELD_VALUES["status.podIP"])


@dataclass
class Localizer:
    """Rewrites cluster addresses to loopback and Secret mounts to local cert dirs."""

    secrets: Path | None = None
    ports: dict[int, int] = field(default_factory=dict)

    def port(self, port: int) -> int:
        if port not in self.ports:
            self.ports[port] = free_port()
        return self.ports[port]

    def value(self, value: str, mounts: dict[str, str]) -> str:
        for host in CLUSTER_HOSTS:
            value = value.replace(host, "127.0.0.1")
        for path, secret in mounts.items():
            if value.startswith(path + "/"):
                assert self.secrets is not None, value
                value = str(self.secrets / secret / value[len(path) + 1:])
        return re.sub(r"127\.0\.0\.1:(\d+)",
                      lambda m: f"127.0.0.1:{self.port(int(m.group(1)))}", value)

    def env(self, c: Container, **overrides: str) -> dict[str, str]:
        volumes = {v["name"]: v["secret"]["secretName"] for v in c.pod.get("volumes", [])
                   if "secret" in v}
        volumes.update({v["name"]: "kvroute-agent-tls" for v in c.pod.get("volumes", [])
                        if v.get("csi", {}).get("driver") == "csi.cert-manager.io"})
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c.spec.get("volumeMounts", [])
                  if m["name"] in volumes}
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update({k: self.value(v, mounts) for k, v in c.env.items()
                    if k.startswith(ENV_PREFIX)})
        env.update(overrides)
        return env


def start(stack: ExitStack, c: Container, loc: Localizer, workdir: Path,
          **overrides: str) -> dict[str, str]:
    """Start the container's role as a process; returns the environment it got."""
    env = loc.env(c, **overrides)
    # The harness would add --listen 127.0.0.1:0; pass the manifest's (localized) values.
    args = ["--listen", env["KVROUTE_LISTEN"], "--metrics-listen", env["KVROUTE_METRICS_LISTEN"]]
    assert c.spec["args"][2:] == [], "extra args would have to be passed here too"
    stack.enter_context(running_server(c.spec["args"][1], args, workdir, name=c.spec["name"],
                                       env=env))
    return env


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


def channel(target: str, secrets: Path | None, server_name: str,
            cert: str = "kvroute-router-tls") -> grpc.Channel:
    """A client channel as a gateway or reader would open it (mTLS with the router's client
    certificate: the registry lets only readers list nodes)."""
    if secrets is None:
        return grpc.insecure_channel(target)
    d = secrets / cert
    creds = grpc.ssl_channel_credentials((d / "ca.crt").read_bytes(),
                                         (d / "tls.key").read_bytes(),
                                         (d / "tls.crt").read_bytes())
    return grpc.secure_channel(target, creds, [("grpc.ssl_target_name_override", server_name)])


def run_fleet(overlay: str, tmp: Path, etcd_endpoint: str, etcd_prefix: str,
              secrets: Path | None) -> None:
    found = {c.spec["name"]: c for c in containers(render(K8S / "overlays" / overlay))}
    sim = next(c for c in containers(render(K8S / "overlays" / "dev")) if c.role == "engine-sim")
    loc = Localizer(secrets)
    # DNS stand-in: the name clients would derive from kvroute-registry:50051.
    tls_name = {"KVROUTE_CLIENT_TLS_SERVER_NAME": "kvroute-registry"} if secrets else {}
    with ExitStack() as stack:
        start(stack, found["registry"], loc, tmp, KVROUTE_ETCD_ENDPOINTS=etcd_endpoint,
              KVROUTE_ETCD_PREFIX=etcd_prefix, KVROUTE_ETCD_CA_FILE="",
              KVROUTE_ETCD_CERT_FILE="", KVROUTE_ETCD_KEY_FILE="")
        start(stack, found["router"], loc, tmp, **tls_name)
        agent_c = found["node-agent"]
        agent_env = loc.env(agent_c)
        overrides = {}
        if found.get("vllm") is not None:
            # engine_sim in vLLM's place: its model; capacity as vLLM's metrics would tell.
            overrides = {"KVROUTE_CAPACITY_BLOCKS": sim.env["KVROUTE_CAPACITY_BLOCKS"]}
            assert sim.env["KVROUTE_LISTEN"].endswith(":8000")
        start(stack, sim, loc, tmp, KVROUTE_MODEL=agent_env["KVROUTE_MODEL"])
        start(stack, agent_c, loc, tmp, **tls_name, **overrides)
        check_routes_to_cached_blocks(loc, agent_env, secrets)


def check_routes_to_cached_blocks(loc: Localizer, agent_env: dict[str, str],
                                  secrets: Path | None) -> None:
    node_id, engine_url = agent_env["KVROUTE_NODE_ID"], agent_env["KVROUTE_ENGINE_URL"]
    model = agent_env["KVROUTE_MODEL"]
    with channel(f"127.0.0.1:{loc.ports[50051]}", secrets, "kvroute-registry") as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)

        def registered() -> list[registry_pb2.NodeInfo]:
            nodes = stub.ListNodes(registry_pb2.ListNodesRequest(), timeout=2).nodes
            return [n for n in nodes if n.node_id == node_id]

        (node,) = poll("the agent to register its engine", registered)
    assert node.address == engine_url and node.model == model

    tokens = list(range(1, 65))  # 4 blocks of 16
    body = json.dumps({"model": model, "prompt": tokens, "max_tokens": 1}).encode()
    req = urllib.request.Request(f"{engine_url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200

    with channel(f"127.0.0.1:{loc.ports[50052]}", secrets, "kvroute-router") as ch:
        route = router_pb2_grpc.RouterStub(ch).Route

        def cached() -> router_pb2.RouteResponse | None:
            r = route(router_pb2.RouteRequest(request_id="k8s", token_ids=tokens + [99] * 16,
                                              model=model), timeout=2)
            return r if r.matched_blocks >= 4 else None

        decision = poll("the router to see the engine's cached blocks", cached)
    assert decision.node_id == node_id and decision.address == engine_url
    assert not decision.degraded


def test_dev_overlay_runs_as_a_fleet(tmp_path: Path, etcd_endpoint: str,
                                     etcd_prefix: str) -> None:
    run_fleet("dev", tmp_path, etcd_endpoint, etcd_prefix, secrets=None)


@pytest.fixture
def secrets(tmp_path: Path) -> Iterator[Path]:
    """The gRPC Secrets of components/tls, one CA, SANs and usages as k8s/README.md says."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = tmp_path / "secrets"
    ca = None
    # identities of components/registry-auth: the router reads, the agent writes its pod's node
    uris = {"kvroute-router": ("spiffe://kvroute/reader/kvroute-router",),
            "kvroute-agent": (f"spiffe://kvroute/agent/{FIELD_VALUES['metadata.name']}",)}
    for name in ("kvroute-registry", "kvroute-router", "kvroute-agent"):
        d = root / f"{name}-tls"
        d.mkdir(parents=True)
        if ca is not None:
            for f in ("ca.crt", "ca.key"):
                shutil.copy2(ca / f, d / f)
        make_certs(d, name, new_ca=ca is None, uris=uris.get(name, ()))
        ca = ca or d
    yield root


def test_production_overlay_runs_as_a_fleet_with_mtls(tmp_path: Path, etcd_endpoint: str,
                                                      etcd_prefix: str, secrets: Path) -> None:
    run_fleet("production", tmp_path, etcd_endpoint, etcd_prefix, secrets=secrets)
