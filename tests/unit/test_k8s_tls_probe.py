"""The exec health probe of the TLS component works against a real registry serving mTLS.

The kubelet's grpc probe speaks plaintext only, so with TLS the manifests run
k8s/components/tls/grpc_health_tls.py with the pod's own KVROUTE_TLS_* files. Here: certificates
made with openssl the way the README says (CA; server cert with server+client auth usages and the
Service name as SAN), a real ``kvroute serve registry --store memory`` with mTLS, and the probe
run as the kubelet would run it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import running_server

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "k8s" / "components" / "tls" / "grpc_health_tls.py"

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


def probe(target: str, server_name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PROBE), target, server_name], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


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
        assert no_cert.returncode == 1 and "failed" in no_cert.stdout
        # A name the certificate does not carry fails verification.
        wrong = probe(target, "someone-else", env)
        assert wrong.returncode == 1 and "failed" in wrong.stdout
    down = probe(target, "kvroute-registry", env)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout
