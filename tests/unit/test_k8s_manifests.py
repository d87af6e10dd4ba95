"""The Kubernetes manifests name only what the code really has.

Every kustomization under k8s/ is rendered offline (``kubectl kustomize``) and each kvroute
container is checked against the CLI: its args parse with ``cli.main.build_parser()``, every
``KVROUTE_*`` variable it gets is a flag of its role, the settings load (the settings classes'
own validation runs), and ports, probes, Services, block sizes and engine endpoints agree with
those settings. A renamed flag or a moved port fails here, not in a cluster.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import build_parser
from kvroute import __version__
from kvroute.settings import ENV_PREFIX, env_name, from_namespace

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KVROUTE_IMAGE = re.compile(r"(^|/)kvroute:")
SETTINGS = {  # role -> (module, class); the class the role's `run` builds
    "registry": ("registry_service.settings", "RegistrySettings"),
    "router": ("router_service.settings", "RouterSettings"),
    "epp": ("router_service.epp.settings", "EppSettings"),
    "gateway": ("router_service.gateway.settings", "GatewaySettings"),
    "agent": ("node_agent.settings", "AgentSettings"),
    "engine-sim": ("engine_sim.settings", "EngineSimSettings"),
}
FIELD_VALUES = {"metadata.name": "pod-name-0", "metadata.namespace": "kvroute",
                "status.podIP": "10.1.2.3"}


def kustomizations() -> list[Path]:
    """Every directory under k8s/ that renders on its own (components only build in overlays)."""
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml")
                  if "components" not in p.relative_to(K8S).parts)


@cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize DIR`` renders (skips the test if kubectl is missing)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations offline")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                         text=True, check=False, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    assert not out.stderr.strip(), f"kustomize warned for {directory}:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@dataclass
class Container:
    """One container of one rendered workload, with its environment resolved."""

    where: str
    workload: dict[str, Any]
    pod: dict[str, Any]
    spec: dict[str, Any]
    env: dict[str, str]

    @property
    def role(self) -> str | None:
        """The kvroute role it serves, or None for other images."""
        if not KVROUTE_IMAGE.search(self.spec.get("image", "")):
            return None
        args = self.spec.get("args", [])
        return args[1] if len(args) >= 2 and args[0] == "serve" else None

    def port(self, name: str) -> int:
        """containerPort of the named port."""
        for p in self.spec.get("ports", []):
            if p.get("name") == name:
                return int(p["containerPort"])
        raise AssertionError(f"{self.where}: no container port named {name!r}")


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def containers(objs: tuple[dict[str, Any], ...]) -> Iterator[Container]:
    """Containers of every Deployment/StatefulSet, env from envFrom ConfigMaps and env."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    for o in objs:
        if o["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = o["spec"]["template"]["spec"]
        for c in pod["containers"]:
            env: dict[str, str] = {}
            for ref in c.get("envFrom", []):
                name = ref["configMapRef"]["name"]
                assert name in maps, f"{o['metadata']['name']}: ConfigMap {name} not rendered"
                env.update(maps[name])
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = _expand(str(e["value"]), env)
                    # Kubernetes expands $(VAR) only for VAR defined earlier in the list.
                    assert "$(" not in env[e["name"]], (
                        f"{o['metadata']['name']}/{c['name']}: {e['name']} refers to a "
                        f"variable not defined before it: {e['value']}")
                elif "fieldRef" in e.get("valueFrom", {}):
                    env[e["name"]] = FIELD_VALUES[e["valueFrom"]["fieldRef"]["fieldPath"]]
                # optional secretKeyRefs are left unset: the manifests must work without them
            yield Container(f"{o['kind']}/{o['metadata']['name']}/{c['name']}", o, pod, c, env)


@cache
def role_parser(role: str) -> argparse.ArgumentParser:
    """The argparse parser of ``kvroute serve ROLE``, taken from the real CLI."""
    def sub(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                chosen: argparse.ArgumentParser = action.choices[name]
                return chosen
        raise AssertionError(f"the CLI has no subcommand {name!r}")
    return sub(sub(build_parser(), "serve"), role)


def role_env_names(role: str) -> set[str]:
    """Every KVROUTE_* variable the role reads: one per flag (dest = settings field)."""
    return {env_name(a.dest) for a in role_parser(role)._actions
            if a.option_strings and a.dest not in ("help",)}


def load_settings(c: Container) -> Any:
    """Build the role's settings exactly as ``kvroute serve ROLE`` would in that container."""
    assert c.role is not None
    module, cls_name = SETTINGS[c.role]
    cls = getattr(__import__(module, fromlist=[cls_name]), cls_name)
    ns = build_parser().parse_args(c.spec["args"])
    return from_namespace(cls, ns, environ=c.env)


def all_kvroute() -> Iterator[tuple[Path, Container]]:
    for d in kustomizations():
        for c in containers(render(d)):
            if c.role is not None:
                yield d, c


def hostport(value: str) -> tuple[str, int]:
    """HOST and PORT of ``HOST:PORT`` or ``scheme://HOST:PORT[/path]``."""
    netloc = value.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = netloc.rpartition(":")
    return host.strip("[]"), int(port)


def test_every_overlay_and_example_renders() -> None:
    names = {str(d.relative_to(K8S)) for d in kustomizations()}
    assert {"base", "overlays/dev", "overlays/production", "examples/vllm",
            "examples/engine-sim"} <= names
    for d in kustomizations():
        assert render(d), d


def test_no_deprecated_kustomize_fields() -> None:
    deprecated = ("commonLabels", "bases", "patchesStrategicMerge", "patchesJson6902", "vars",
                  "imageTags")
    for path in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert not set(doc) & set(deprecated), f"{path}: deprecated {set(doc) & set(deprecated)}"


def test_container_commands_are_real_cli_commands() -> None:
    seen = set()
    for d, c in all_kvroute():
        assert "command" not in c.spec or c.spec["command"] == ["kvroute"], c.where
        assert c.role in SETTINGS, f"{d}: {c.where} runs unknown role {c.role}"
        build_parser().parse_args(c.spec["args"])  # SystemExit(2) on an unknown flag
        seen.add(c.role)
    assert seen == set(SETTINGS), f"roles never deployed: {set(SETTINGS) - seen}"


def test_every_kvroute_variable_is_a_flag_of_its_role() -> None:
    for d, c in all_kvroute():
        assert c.role is not None
        unknown = {k for k in c.env if k.startswith(ENV_PREFIX)} - role_env_names(c.role)
        assert not unknown, (f"{d}: {c.where} sets {sorted(unknown)}, which `kvroute serve "
                             f"{c.role}` does not read")


def test_settings_load_from_the_manifests() -> None:
    for d, c in all_kvroute():
        try:
            load_settings(c)
        except Exception as exc:  # ConfigError names the flag
            pytest.fail(f"{d}: {c.where}: settings do not load: {exc}")


def _probe_port(probe: dict[str, Any], c: Container) -> int:
    if "grpc" in probe:
        return int(probe["grpc"]["port"])
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        return c.port(port) if isinstance(port, str) else int(port)
    command = probe["exec"]["command"]
    return hostport(next(a for a in command if re.fullmatch(r"[\w.\-]+:\d+", a)))[1]


def test_ports_and_probes_follow_the_listen_settings() -> None:
    for d, c in all_kvroute():
        s = load_settings(c)
        listen, metrics = hostport(s.listen)[1], hostport(s.metrics_listen)[1]
        http_api = c.role in ("engine-sim", "gateway")
        grpc_or_http = "http" if http_api else "grpc"
        assert c.port(grpc_or_http) == listen, f"{d}: {c.where} port vs --listen"
        assert c.port("metrics") == metrics, f"{d}: {c.where} port vs --metrics-listen"
        assert hostport(s.listen)[0] in ("0.0.0.0", "::"), f"{d}: {c.where} listens on loopback"
        for kind in ("readinessProbe", "livenessProbe"):
            assert kind in c.spec, f"{d}: {c.where} has no {kind}"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in c.spec:
                probe = c.spec[kind]
                assert _probe_port(probe, c) == listen, f"{d}: {c.where} {kind} port"
                if c.role == "gateway":  # /health = ready (a healthy node known), /live = up
                    path = probe["httpGet"]["path"]
                    assert path == ("/health" if kind == "readinessProbe" else "/live"), kind
                    tls = "HTTPS" if s.tls_cert_file else "HTTP"
                    assert probe["httpGet"].get("scheme", "HTTP") == tls, f"{d}: {c.where}"
                elif not http_api:
                    assert "grpc" in probe or "exec" in probe, f"{d}: {c.where} {kind}"
        annotations = c.workload["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            ports = {int(p["containerPort"]) for x in c.pod["containers"]
                     for p in x.get("ports", []) if p.get("name") == "metrics"}
            assert int(annotations["prometheus.io/port"]) in ports, f"{d}: {c.where}"


def test_drain_fits_in_the_termination_grace_period() -> None:
    for d, c in all_kvroute():
        grace = c.pod.get("terminationGracePeriodSeconds", 30)
        assert load_settings(c).drain_timeout_s + 5 <= grace, f"{d}: {c.where}"


def test_services_target_named_ports_of_their_pods() -> None:
    for d in kustomizations():
        objs = render(d)
        pods = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
        for svc in (o for o in objs if o["kind"] == "Service"):
            sel = svc["spec"]["selector"]
            matched = [p for p in pods if sel.items() <= p["spec"]["template"]["metadata"]
                       ["labels"].items()]
            assert matched, f"{d}: Service {svc['metadata']['name']} selects no pods"
            for port in svc["spec"]["ports"]:
                found = {int(cp["containerPort"]) for p in matched
                         for c in p["spec"]["template"]["spec"]["containers"]
                         for cp in c.get("ports", []) if cp.get("name") == port["targetPort"]}
                assert found == {int(port["port"])}, f"{d}: {svc['metadata']['name']} {port}"


def _service_port(objs: tuple[dict[str, Any], ...], host: str) -> set[int]:
    name = host.split(".", maxsplit=1)[0]
    return {int(p["port"]) for o in objs if o["kind"] == "Service"
            and o["metadata"]["name"] == name for p in o["spec"]["ports"]}


def test_clients_point_at_real_services() -> None:
    base = render(K8S / "base")
    for d, c in all_kvroute():
        s = load_settings(c)
        objs = render(d) + base
        if c.role in ("router", "gateway", "agent"):
            host, port = hostport(s.registry)
            assert port in _service_port(objs, host), f"{d}: {c.where} --registry {s.registry}"
        if c.role == "registry":
            sts = [o for o in render(d) if o["kind"] == "StatefulSet"
                   and o["metadata"]["name"] == "kvroute-etcd"]
            if not sts:  # external etcd: nothing in the cluster to check against
                continue
            members = {f"kvroute-etcd-{i}.{sts[0]['spec']['serviceName']}"
                       for i in range(sts[0]["spec"]["replicas"])}
            given = s.etcd_endpoints
            given = given.split(",") if isinstance(given, str) else given
            endpoints = [hostport(e.strip().split("://")[-1]) for e in given]
            assert {h for h, _ in endpoints} == members, f"{d}: {s.etcd_endpoints}"
            assert {p for _, p in endpoints} == {2379}


def _vllm_flags(c: Container) -> dict[str, str]:
    flags = {}
    for arg in c.spec.get("args", []):
        if arg.startswith("--"):
            key, _, value = arg.partition("=")
            flags[key] = value
    return flags


def test_engines_agents_and_control_plane_agree() -> None:
    base = {c.role: load_settings(c) for c in containers(render(K8S / "base")) if c.role}
    for d in kustomizations():
        pods: dict[str, list[Container]] = {}
        for c in containers(render(d)):
            pods.setdefault(c.where.rsplit("/", 1)[0], []).append(c)
        for where, group in pods.items():
            agents = [load_settings(c) for c in group if c.role == "agent"]
            if not agents:
                continue
            (agent,) = agents
            assert agent.block_size == base["registry"].block_size == base["router"].block_size
            if hasattr(agent, "hash_salt"):
                assert agent.hash_salt == base["router"].hash_salt, f"{d}: {where}"
            events, replay = hostport(agent.engine_events), hostport(agent.engine_replay)
            assert events[0] == replay[0] == "127.0.0.1", f"{d}: {where}: sidecar on localhost"
            engines = [c for c in group if c.role != "agent"]
            assert len(engines) == 1, f"{d}: {where}"
            engine = engines[0]
            assert hostport(agent.engine_url)[1] == engine.port("http"), f"{d}: {where}"
            if engine.role == "engine-sim":
                sim = load_settings(engine)
                assert (sim.events_endpoint, sim.replay_endpoint, sim.topic, sim.block_size,
                        sim.model) == (agent.engine_events, agent.engine_replay, agent.topic,
                                       agent.block_size, agent.model), f"{d}: {where}"
                assert agent.capacity_blocks in (0, sim.capacity_blocks), f"{d}: {where}"
                continue
            flags = _vllm_flags(engine)
            assert int(flags["--block-size"]) == agent.block_size, f"{d}: {where}"
            assert engine.env.get("PYTHONHASHSEED"), f"{d}: {where}: PYTHONHASHSEED unset"
            assert _expand(engine.spec["args"][0], engine.env) == agent.model
            cfg = json.loads(flags["--kv-events-config"])
            assert cfg["enable_kv_cache_events"] is True and cfg["publisher"] == "zmq"
            assert hostport(cfg["endpoint"])[1] == events[1], f"{d}: {where}"
            assert hostport(cfg["replay_endpoint"])[1] == replay[1], f"{d}: {where}"
            assert cfg.get("topic", "") == agent.topic, f"{d}: {where}"


def test_images_are_pinned_and_match_the_package_version() -> None:
    for d in kustomizations():
        for c in containers(render(d)):
            image = c.spec["image"]
            assert ":" in image and not image.endswith(":latest"), f"{d}: {c.where}: {image}"
            if c.role is not None:
                assert image.endswith(f"/kvroute:{__version__}") or image == (
                    f"kvroute:{__version__}"), f"{d}: {c.where}: {image}"
            elif image.startswith("quay.io/coreos/etcd:"):
                major, minor, patch = map(int, image.split(":v")[1].split("."))
                # 3.5.1 (the test binary) has known data-inconsistency and lease bugs
                assert (major, minor) == (3, 5) and patch >= 10, image
            else:
                assert image.startswith("vllm/vllm-openai:v"), f"{d}: {c.where}: {image}"


def test_router_gateway_and_epp_replicas_share_their_view_of_load() -> None:
    """Issue 19: wherever a routing front runs 2+ replicas (or an HPA scales it), the
    replicas share routing deltas through the registry (--share-routes)."""
    for d in kustomizations():
        objs = render(d)
        hpa = {o["spec"]["scaleTargetRef"]["name"] for o in objs
               if o.get("kind") == "HorizontalPodAutoscaler"}
        for c in containers(objs):
            if c.role not in ("router", "gateway", "epp"):
                continue
            name = c.workload["metadata"]["name"]
            if int(c.workload["spec"].get("replicas", 1)) < 2 and name not in hpa:
                continue
            s = load_settings(c)
            assert s.share_routes, f"{d}: {c.where} runs several replicas without " \
                                   f"KVROUTE_SHARE_ROUTES=true"


def test_registry_replicas_relay_their_share_hubs_to_one_another() -> None:
    """Issue 19: every registry replica advertises its RouteShare hub at its own pod IP (never
    the Service), with the port it listens on; TLS relays expect the name the registry
    certificates carry; the NetworkPolicy lets registry pods reach one another."""
    for d, c in all_kvroute():
        if c.role != "registry":
            continue
        s = load_settings(c)
        assert s.share_relay, f"{d}: {c.where} runs without the RouteShare relay"
        host, port = hostport(s.share_relay_advertise)
        assert host == FIELD_VALUES["status.podIP"], f"{d}: {c.where} advertises {host}"
        assert port == hostport(s.listen)[1], f"{d}: {c.where} advertises port {port}"
        if s.tls_cert_file:
            assert s.share_relay_server_name == "kvroute-registry", f"{d}: {c.where}"
        policies = [o for o in render(d) if o["kind"] == "NetworkPolicy"
                    and o["spec"]["podSelector"].get("matchLabels", {}).get(
                        "app.kubernetes.io/name") == "kvroute-registry"]
        for pol in policies:
            peers = [(f.get("podSelector", {}).get("matchLabels", {}), r.get("ports", []))
                     for r in pol["spec"].get("ingress", []) for f in r.get("from", [])]
            assert any(sel == {"app.kubernetes.io/name": "kvroute-registry"}
                       and any(int(p["port"]) == port for p in ports)
                       for sel, ports in peers), f"{d}: registry pods cannot reach each other"
