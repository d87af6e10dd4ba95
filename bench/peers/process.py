"""A peer router that runs as its own process on loopback (sglang-router, vllm-router)."""

from __future__ import annotations

import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from bench.peers.base import HUB_GUARD
from kvroute.procs import ManagedProcess, wait_until

BIN = Path(sys.executable).parent


def find_executable(name: str) -> str | None:
    """``name`` next to this interpreter (the venv), else on PATH."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class RouterProcess:
    """Start ``argv``, wait for ``GET /health`` on ``port``; stop by pid."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path,
                 startup_timeout_s: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.env_extra = dict(env or {})
        self.argv = argv
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.startup_timeout_s = startup_timeout_s
        self.proc: ManagedProcess | None = None

    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start with the hub-download guard; raise with the log tail if it never gets healthy."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HF_ENDPOINT=HUB_GUARD, HF_HUB_OFFLINE="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                   **self.env_extra)
        self.proc = ManagedProcess(self.name, self.argv, self.log_path, env=env).start()
        try:
            wait_until(lambda: _healthy(self.base + "/health"), self.startup_timeout_s,
                       f"{self.name} /health", interval_s=0.2, proc=self.proc.proc)
        except BaseException as exc:
            tail = self.proc.tail()
            self.stop()
            raise RuntimeError(f"{exc}\n--- {self.name} log ---\n{tail}") from exc

    def stop(self) -> None:
        """Stop the process by its pid (idempotent)."""
        if self.proc is not None:
            self.proc.stop(grace_s=5.0)
            self.proc = None
