"""The exec health probe of the TLS component, and every client command, against real mTLS servers.

The kubelet's grpc probe speaks plaintext only, so with TLS the manifests exec ``kvroute health``
with the pod's own KVROUTE_TLS_* files. Here: certificates made with openssl the way the README
says (CA; server cert with server+client auth usages and the Service name as SAN), a real
``kvroute serve registry --store memory`` and router with mTLS, the probe run as the kubelet would
run it (the pod's environment, the manifest's command line), and nodes/route/stats/complete
with their --tls-* flags.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from kvroute.v1 import registry_pb2, registry_pb2_grpc
from tests.harness import running_server

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path, name: str, new_ca: bool = True, uris: tuple[str, ...] = ()) -> None:
    """ca.crt/ca.key (unless given), then tls.crt/tls.key for ``name`` signed by it (server +
    client auth; SANs ``name`` and ``name.kvroute.svc``, plus ``uris`` as URI SANs: the
    registry's identities, spiffe://kvroute/<role>/<name>)."""
    if new_ca:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj",
                "/CN=kvroute-test-ca", cwd=d)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={name}", cwd=d)
    (d / "ext.cnf").write_text(
        f"subjectAltName=DNS:{name},DNS:{name}.kvroute.svc{''.join(',URI:' + u for u in uris)}\n"
        "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)


def kvroute(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env={"PATH": "/usr/bin:/bin",
                          **env}, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


def probe(target: str, server_name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The manifest's probe command line, with the pod's KVROUTE_TLS_* environment."""
    return kvroute("health", "--server", target, "--tls-server-name", server_name, "--quiet",
                   env=env)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_probe_against_a_real_mtls_registry(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    certs.mkdir()
    make_certs(certs, "kvroute-registry")
    env = {"KVROUTE_TLS_CERT_FILE": str(certs / "tls.crt"),
           "KVROUTE_TLS_KEY_FILE": str(certs / "tls.key"),
           "KVROUTE_TLS_CA_FILE": str(certs / "ca.crt")}
    args = ["--store", "memory", "--tls-cert-file", env["KVROUTE_TLS_CERT_FILE"],
            "--tls-key-file", env["KVROUTE_TLS_KEY_FILE"],
            "--tls-ca-file", env["KVROUTE_TLS_CA_FILE"]]
    with running_server("registry", args, tmp_path) as srv:
        target = srv.grpc_target
        ok = probe(target, "kvroute-registry", env)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        # Without a client certificate mTLS refuses the call: the probe fails, it does not hang.
        no_cert = probe(target, "kvroute-registry", {"KVROUTE_TLS_CA_FILE": env[
            "KVROUTE_TLS_CA_FILE"]})
        assert no_cert.returncode == 1 and "failed" in no_cert.stderr
        # A name the certificate does not carry fails verification.
        wrong = probe(target, "someone-else", env)
        assert wrong.returncode == 1 and "failed" in wrong.stderr
        # Plaintext against a TLS server: the message points at the TLS flags.
        plain = kvroute("health", "--server", target, env={})
        assert plain.returncode == 1 and "--tls-ca-file" in plain.stderr
    down = probe(target, "kvroute-registry", env)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_every_client_command_speaks_mtls(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    certs.mkdir()
    make_certs(certs, "kvroute-registry")
    ca, crt, key = str(certs / "ca.crt"), str(certs / "tls.crt"), str(certs / "tls.key")
    server = ["--tls-cert-file", crt, "--tls-key-file", key, "--tls-ca-file", ca]
    client = ["--tls-ca-file", ca, "--tls-cert-file", crt, "--tls-key-file", key,
              "--tls-server-name", "kvroute-registry"]
    # n1 is registered once and never heartbeats: an hour's lease (120 s made it late after
    # 82 s, which the router's start, up to 30 s of health polls and the CLI runs approach on
    # a loaded machine)
    with running_server("registry", ["--store", "memory", "--lease-ttl-s", "3600", *server],
                        tmp_path) as reg:
        creds = grpc.ssl_channel_credentials(Path(ca).read_bytes(), Path(key).read_bytes(),
                                             Path(crt).read_bytes())
        with grpc.secure_channel(reg.grpc_target, creds, options=[
                ("grpc.ssl_target_name_override", "kvroute-registry")]) as ch:
            stub = registry_pb2_grpc.RegistryStub(ch)
            r = stub.RegisterNode(registry_pb2.RegisterNodeRequest(
                node_id="n1", address="n1:8000", model="m", block_size=16,
                capacity_blocks=100), timeout=5)
            stub.Heartbeat(registry_pb2.HeartbeatRequest(node_id="n1", epoch=r.epoch,
                                                         write_token=r.write_token,
                                                         delta_seq=1), timeout=5)
        router_args = [*server, "--registry", reg.grpc_target, "--client-tls-ca-file", ca,
                       "--client-tls-cert-file", crt, "--client-tls-key-file", key,
                       "--client-tls-server-name", "kvroute-registry"]
        with running_server("router", router_args, tmp_path) as router:
            rt = router.grpc_target
            deadline = time.monotonic() + 30
            while kvroute("health", "--server", rt, *client, env={}).returncode != 0:
                assert time.monotonic() < deadline, "router never SERVING over mTLS"
                time.sleep(0.2)
            out = kvroute("nodes", "--registry", reg.grpc_target, "--json", *client, env={})
            assert out.returncode == 0 and json.loads(out.stdout)["nodes"], out.stderr
            out = kvroute("route", "--router", rt, "--tokens", ",".join(map(str, range(32))),
                          "--keep-inflight", "--request-id", "t1", *client, env={})
            assert out.returncode == 0 and "node:     n1" in out.stdout, out.stderr
            out = kvroute("complete", "--router", rt, "--request-id", "t1", *client, env={})
            assert out.returncode == 0, out.stderr
            out = kvroute("stats", "--router", rt, *client, env={})
            assert out.returncode == 0 and "connected; 1 node(s) known" in out.stdout, out.stderr
            # The same through KVROUTE_* variables only.
            env = {"KVROUTE_ROUTER": rt, "KVROUTE_TLS_CA_FILE": ca, "KVROUTE_TLS_CERT_FILE": crt,
                   "KVROUTE_TLS_KEY_FILE": key, "KVROUTE_TLS_SERVER_NAME": "kvroute-registry"}
            out = kvroute("stats", env=env)
            assert out.returncode == 0, out.stderr
            # Without TLS flags the router is unreachable, and the message says why.
            out = kvroute("stats", "--router", rt, env={})
            assert out.returncode == 1 and "--tls-ca-file" in out.stderr
