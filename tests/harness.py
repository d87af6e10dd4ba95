"""Test helpers: start kvroute servers as real processes on free ports and stop exactly them."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvroute.procs import ManagedProcess, read_ready_file

STOP_GRACE_S = 20.0
"""How long a stopped server has between SIGTERM and SIGKILL (its drain time and then some)."""


@dataclass
class ServerProcess:
    """A running ``kvroute serve ROLE`` process and the ports it reported."""

    role: str
    process: ManagedProcess
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def grpc_target(self) -> str:
        """``127.0.0.1:PORT`` of its gRPC listener."""
        return f"127.0.0.1:{self.ready['grpc_port']}"

    @property
    def metrics_url(self) -> str:
        """URL of its /metrics."""
        return f"http://127.0.0.1:{self.ready['metrics_port']}/metrics"

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL) exactly this process. It gets :data:`STOP_GRACE_S` to exit:
        a server drains for up to its --drain-timeout-s (5 s by default) and then exits 0, and
        a SIGKILL at 5 s (ManagedProcess's default) would fail the exit-0 checks of the tests."""
        return self.process.stop(grace_s=STOP_GRACE_S)


def start_server(role: str, args: Sequence[str], workdir: Path, name: str | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 30.0) -> ServerProcess:
    """Start ``kvroute serve ROLE ARGS`` on free loopback ports and wait until it serves."""
    name = name or role
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "cli.main", "serve", role,
            "--ready-file", str(ready), *args]
    if "--listen" not in args:
        argv += ["--listen", "127.0.0.1:0"]
    if "--metrics-listen" not in args:
        argv += ["--metrics-listen", "127.0.0.1:0"]
    proc = ManagedProcess(name, argv, workdir / f"{name}.log", env=env).start()
    try:
        info = read_ready_file(ready, timeout_s, proc)
    except BaseException:
        proc.stop()
        raise
    return ServerProcess(role, proc, info)


@contextmanager
def running_server(role: str, args: Sequence[str], workdir: Path, **kw: Any,
                   ) -> Iterator[ServerProcess]:
    """Context manager form of :func:`start_server` that always stops the process."""
    srv = start_server(role, args, workdir, **kw)
    try:
        yield srv
    finally:
        srv.stop()


class ServerGroup:
    """The servers one test or fixture started; :meth:`stop` ends exactly these, newest first.

    Use it as a context manager (or call :meth:`stop` in a ``finally``). A stack that starts
    several servers in its constructor starts them through one group and stops the group when a
    later start fails, so a failed start leaks nothing.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[ServerProcess] = []

    def start(self, role: str, args: Sequence[str], name: str | None = None,
              **kw: Any) -> ServerProcess:
        """:func:`start_server` in this group's workdir; the server joins the group."""
        return self.add(start_server(role, args, self.workdir, name=name, **kw))

    def add(self, srv: ServerProcess) -> ServerProcess:
        """Make ``srv`` (started elsewhere) part of the group."""
        self.servers.append(srv)
        return srv

    @contextmanager
    def stopped_on_error(self) -> Iterator[ServerGroup]:
        """Stop the whole group when the block raises (a stack's constructor starting its
        servers one after the other), then re-raise."""
        try:
            yield self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every server of the group, newest first (each exactly its own pid); stopping
        one that already exited is a no-op. The first error is raised after all were tried."""
        error: BaseException | None = None
        for srv in reversed(self.servers):
            try:
                srv.stop()
            except BaseException as exc:  # keep stopping the others
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wait_serving(srv: ServerProcess, within_s: float = 30.0) -> None:
    """Until the server's gRPC health (service "") answers SERVING. A router writes its ready
    file when it listens, before its placement mirror has a snapshot: a Route in between fails
    UNAVAILABLE; its health turns SERVING once it knows a node."""
    deadline = time.monotonic() + within_s
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            with contextlib.suppress(grpc.RpcError):
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{srv.process.name} not SERVING within {within_s} s\n"
                                     f"{srv.process.tail()}")
            time.sleep(0.05)


def scrape(url: str, timeout_s: float = 5.0) -> str:
    """The text of a Prometheus page: a server's ``metrics_url``, a gateway's or etcd's
    ``/metrics``. Read a value from it with :func:`metric`."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str) -> float:
    """The sum of every sample of metric ``name`` (any labels) in a Prometheus text page;
    fails the test when the page does not export it."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"metric {name} not exported"
    return total


async def until(cond: Callable[[], bool], within_s: float = 20.0, what: str = "") -> None:
    """Poll ``cond`` every 20 ms until it holds; AssertionError naming ``what`` after
    ``within_s`` seconds."""
    for _ in range(int(within_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not reached within {within_s} s: {what or 'condition'}")
