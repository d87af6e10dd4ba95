"""Hardening and availability of the rendered manifests: securityContext, ServiceAccounts,
NetworkPolicies (who reaches the registry and etcd), PodDisruptionBudgets, topology spread,
resources, and TLS material mounted from Secrets where the settings point."""

from __future__ import annotations

import re
from typing import Any

from tests.unit.test_k8s_manifests import (
    K8S,
    ROOT,
    Container,
    containers,
    kustomizations,
    load_settings,
    render,
)

WORKLOADS = ("Deployment", "StatefulSet")


def workloads(objs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in WORKLOADS]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels / matchExpressions In) matches ``labels``."""
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_pods_and_containers_are_locked_down() -> None:
    uid = int(re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)[1])  # type: ignore[index]
    for d in kustomizations():
        objs = render(d)
        accounts = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceAccount"}
        for w in workloads(objs):
            name = f"{d.relative_to(K8S)}: {w['metadata']['name']}"
            pod = w["spec"]["template"]["spec"]
            assert pod.get("automountServiceAccountToken") is False, name
            sa = pod.get("serviceAccountName")
            assert sa in accounts, f"{name}: ServiceAccount {sa} not rendered"
            assert accounts[sa].get("automountServiceAccountToken") is False, name
            assert pod.get("enableServiceLinks") is False, name
            psc = pod["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == (
                "RuntimeDefault"), name
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
                assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
                assert sc["capabilities"]["drop"] == ["ALL"], f"{name}/{c['name']}"
                assert "add" not in sc["capabilities"], f"{name}/{c['name']}"
                res = c["resources"]
                assert {"cpu", "memory"} <= set(res["requests"]), f"{name}/{c['name']}"
                assert "memory" in res["limits"], f"{name}/{c['name']}"
                if c["image"].split("/")[-1].startswith("kvroute:"):
                    assert psc.get("runAsUser", sc.get("runAsUser")) == uid, (
                        f"{name}: kvroute runs as the Dockerfile's USER {uid}")


def test_control_plane_is_replicated_with_budgets_and_spread() -> None:
    objs = render(K8S / "base")
    by_name = {w["metadata"]["name"]: w for w in workloads(objs)}
    assert by_name["kvroute-etcd"]["spec"]["replicas"] == 3
    assert by_name["kvroute-registry"]["spec"]["replicas"] >= 2
    assert by_name["kvroute-router"]["spec"]["replicas"] >= 2
    assert by_name["kvroute-gateway"]["spec"]["replicas"] >= 2
    hpas = {o["spec"]["scaleTargetRef"]["name"] for o in objs
            if o["kind"] == "HorizontalPodAutoscaler"}
    assert "kvroute-gateway" in hpas
    sts = by_name["kvroute-etcd"]["spec"]
    assert sts["podManagementPolicy"] == "Parallel"
    assert sts["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    for d in kustomizations():
        objs = render(d)
        pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
        for w in workloads(objs):
            labels = w["spec"]["template"]["metadata"]["labels"]
            name = f"{d.relative_to(K8S)}: {w['metadata']['name']}"
            assert any(selects(p["spec"]["selector"], labels) for p in pdbs), f"{name}: no PDB"
            spread = w["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
            assert any(selects(t["labelSelector"], labels) for t in spread), f"{name}: no spread"


def _reachers(objs: tuple[dict[str, Any], ...], target: str, port: int) -> set[str]:
    """Workloads whose pods the NetworkPolicies let reach ``port`` of ``target``'s pods."""
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
            for w in workloads(objs)}
    policies = [o["spec"] for o in objs if o["kind"] == "NetworkPolicy"
                and selects(o["spec"]["podSelector"], pods[target])]
    assert policies, f"no NetworkPolicy selects {target}"
    allowed: set[str] = set()
    for pol in policies:
        for rule in pol.get("ingress", []):
            if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
                continue
            peers = rule.get("from")
            if not peers:
                return {"<anyone>"}
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"unexpected peer {peer}"
                allowed |= {n for n, lab in pods.items() if selects(peer["podSelector"], lab)}
    return allowed


def test_only_routers_agents_and_registries_reach_the_registry_and_only_it_reaches_etcd() -> None:
    for d in kustomizations():
        objs = render(d)
        names = {w["metadata"]["name"] for w in workloads(objs)}
        if "kvroute-registry" in names:
            agents = {c.workload["metadata"]["name"] for c in containers(objs)
                      if c.role == "agent"}
            # routers, gateways and endpoint pickers (a router inside the request path)
            routers = {"kvroute-router", "kvroute-gateway", "kvroute-epp"} & names
            # ... and the other registry replicas (the RouteShare relay between hubs)
            assert _reachers(objs, "kvroute-registry", 50051) == \
                routers | agents | {"kvroute-registry"}, d
            assert _reachers(objs, "kvroute-registry", 9091) == {"<anyone>"}, "metrics"
        if "kvroute-etcd" in names:
            assert _reachers(objs, "kvroute-etcd", 2379) == {"kvroute-registry"}, d
            assert _reachers(objs, "kvroute-etcd", 2380) == {"kvroute-etcd"}, d
        for c in containers(objs):
            if c.role == "agent":
                labels = c.workload["spec"]["template"]["metadata"]["labels"]
                assert labels.get("kvroute.io/registry-client") == "true", c.where
        deny = [o for o in objs if o["kind"] == "NetworkPolicy" and not o["spec"]["podSelector"]]
        if names & {"kvroute-registry", "kvroute-etcd"}:
            assert deny and "ingress" not in deny[0]["spec"], f"{d}: no default deny"


def _mounted_from(c: Container, path: str) -> dict[str, Any] | None:
    vols: dict[str, dict[str, Any]] = {v["name"]: v for v in c.pod.get("volumes", [])}
    for m in c.spec.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            return vols[m["name"]]
    return None


def test_tls_files_come_from_mounted_secrets() -> None:
    tls_seen = set()
    for d in kustomizations():
        for c in containers(render(d)):
            if c.role is None:
                continue
            s = load_settings(c)
            for field in ("tls_cert_file", "tls_key_file", "tls_ca_file", "client_tls_ca_file",
                          "client_tls_cert_file", "client_tls_key_file", "etcd_ca_file",
                          "etcd_cert_file", "etcd_key_file"):
                path = getattr(s, field, "")
                if not path:
                    continue
                vol = _mounted_from(c, path)
                # a Secret, or a per-pod certificate from the cert-manager CSI driver
                # (components/registry-auth: each agent's own identity)
                per_pod = (vol or {}).get("csi", {}).get("driver") == "csi.cert-manager.io"
                assert vol is not None and ("secret" in vol or per_pod), \
                    f"{d}: {c.where} {field}={path}"
                assert path.rsplit("/", 1)[1] in ("tls.crt", "tls.key", "ca.crt")
                tls_seen.add((d.name, c.role, field.split("_")[0]))
    for overlay in ("production", "production-external-etcd"):
        assert {(overlay, "registry", "tls"), (overlay, "router", "client"),
                (overlay, "gateway", "client"), (overlay, "gateway", "tls"),
                (overlay, "agent", "client"), (overlay, "registry", "etcd")} <= tls_seen


def test_production_etcd_serves_tls_to_clients_and_peers() -> None:
    (etcd,) = [c for c in containers(render(K8S / "overlays" / "production"))
               if c.spec["name"] == "etcd"]
    for var in ("ETCD_LISTEN_CLIENT_URLS", "ETCD_ADVERTISE_CLIENT_URLS", "ETCD_LISTEN_PEER_URLS",
                "ETCD_INITIAL_ADVERTISE_PEER_URLS"):
        assert etcd.env[var].startswith("https://"), var
    assert etcd.env["ETCD_INITIAL_CLUSTER"].count("https://") == 3
    assert etcd.env["ETCD_CLIENT_CERT_AUTH"] == etcd.env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    for var in ("ETCD_CERT_FILE", "ETCD_KEY_FILE", "ETCD_TRUSTED_CA_FILE"):
        vol = _mounted_from(etcd, etcd.env[var])
        assert vol is not None and "secret" in vol, var
    # The probes stay on the plain-HTTP metrics listener, which TLS does not touch.
    assert etcd.env["ETCD_LISTEN_METRICS_URLS"].startswith("http://")


def test_tls_probes_run_kvroute_health_with_the_pods_own_certificates() -> None:
    from cli.main import build_parser

    for c in containers(render(K8S / "overlays" / "production")):
        if c.role not in ("registry", "router"):
            continue
        for var in ("KVROUTE_TLS_CA_FILE", "KVROUTE_TLS_CERT_FILE", "KVROUTE_TLS_KEY_FILE"):
            vol = _mounted_from(c, c.env[var])  # what `kvroute health` presents and trusts
            assert vol is not None and "secret" in vol, var
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = c.spec[kind]["exec"]["command"]
            assert cmd[:2] == ["/opt/kvroute/bin/kvroute", "health"], cmd
            args = build_parser().parse_args(cmd[1:])
            port = {"registry": 50051, "router": 50052}[c.role]
            assert args.server == f"127.0.0.1:{port}"
            assert args.tls_server_name == f"kvroute-{c.role}"
            # A router is NOT_SERVING until it knows a node: only readiness may wait for that.
            want = "liveness" if c.role == "router" and kind != "readinessProbe" else ""
            assert args.service == want, (c.role, kind)
