"""Start and stop child processes we own: free ports, readiness waits, exact-pid shutdown.

Used by the embedded demo, the stack benchmark and the tests. Every process is stopped by the
process id we started (SIGTERM, then SIGKILL after a grace period); nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (bind to 0 and release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str,
               interval_s: float = 0.05, proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll ``check`` until true; TimeoutError naming ``what`` otherwise (or if ``proc`` dies)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process {proc.pid} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout_s:.1f} s")
        time.sleep(interval_s)


class ManagedProcess:
    """One child process with its log file; stop() ends exactly this pid."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(os.environ if env is None else env)
        self._cwd = cwd
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        """Start the process, output appended to ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self._env, cwd=self._cwd, stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        """Process id (after start)."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to exactly this process (SIGSTOP/SIGCONT for pause tests)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM, wait ``grace_s``, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL exactly this process and reap it (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 40) -> str:
        """Last lines of the log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def read_ready_file(path: Path, timeout_s: float, proc: ManagedProcess) -> dict[str, Any]:
    """Wait for a server's ``--ready-file`` JSON (its bound ports) and return it."""
    result: dict[str, Any] = {}

    def check() -> bool:
        if not path.exists():
            return False
        data = json.loads(path.read_text() or "null")
        if not isinstance(data, dict):
            return False
        result.update(data)
        return True

    try:
        wait_until(check, timeout_s, f"{proc.name} ready file", proc=proc.proc)
    except (TimeoutError, RuntimeError) as exc:
        raise RuntimeError(f"{exc}\n--- {proc.name} log ---\n{proc.tail()}") from exc
    return result


def write_ready_file(path: str, data: Mapping[str, Any]) -> None:
    """Atomically write ``data`` as JSON (servers call this once serving)."""
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(dict(data)))
    tmp.replace(path)
