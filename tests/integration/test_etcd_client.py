"""The etcd client against real etcd servers: KV, leases, watches, restarts, pauses, TLS, auth."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kvroute.embedded_etcd import EmbeddedEtcd, find_etcd_binary
from kvroute.errors import ConfigError
from kvroute.procs import free_port
from kvroute.settings import from_namespace
from registry_service.store.etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdSettings,
    EtcdUnavailable,
    WatchCompacted,
    WatchEvent,
    compare_mod_revision,
    compare_value,
    compare_version,
    op_delete_prefix,
    op_get,
    op_put,
)
from tests.harness import metric, scrape

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def _settings(*endpoints: str, **kw: Any) -> EtcdSettings:
    kw.setdefault("etcd_call_timeout_s", 2.0)
    return EtcdSettings(etcd_endpoints=endpoints, **kw)


async def _wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


def _start_watch(client: EtcdClient, prefix: bytes, start: int, out: list[WatchEvent],
                 ) -> asyncio.Task[None]:
    async def run() -> None:
        async for batch in client.watch_prefix(prefix, start):
            out.extend(batch)
    return asyncio.create_task(run())


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_settings_from_env_and_validation() -> None:
    s = from_namespace(EtcdSettings, environ={
        "KVROUTE_ETCD_ENDPOINTS": "127.0.0.1:1, http://127.0.0.1:2",
        "KVROUTE_ETCD_CALL_TIMEOUT_S": "0.5"})
    assert s.endpoints == ("127.0.0.1:1", "127.0.0.1:2") and s.etcd_call_timeout_s == 0.5
    for bad in ({"etcd_endpoints": ("nohost",)}, {"etcd_prefix": "/x"},
                {"etcd_cert_file": "c.pem"}, {"etcd_call_timeout_s": 0},
                {"etcd_max_message_bytes": 1024}):
        with pytest.raises(ConfigError):
            EtcdSettings(**bad)


def _etcd_watchers(etcd: EmbeddedEtcd) -> int:
    """Watchers etcd holds now (from its /metrics)."""
    return int(metric(scrape(f"http://{etcd.endpoint}/metrics", 2),
                      "etcd_debugging_mvcc_watcher_total"))


@pytest.fixture
async def client(etcd_endpoint: str) -> AsyncIterator[EtcdClient]:
    c = EtcdClient(_settings(etcd_endpoint))
    await c.connect()
    try:
        yield c
    finally:
        await c.close()


async def test_write_prefix_lease_watch_and_expiry(client: EtcdClient, etcd_prefix: str) -> None:
    p = etcd_prefix.encode()
    for name in (b"c", b"a", b"b"):
        await client.put(p + name, b"v-" + name)
    kvs, rev = await client.get_prefix(p)
    assert [kv.key for kv in kvs] == [p + b"a", p + b"b", p + b"c"]
    assert rev >= max(kv.mod_revision for kv in kvs)
    assert (await client.get(p + b"a")) is not None
    assert await client.get(p + b"missing") is None

    events: list[WatchEvent] = []
    watch = _start_watch(client, p + b"leased/", rev + 1, events)
    try:
        lease = await client.lease_grant(2)  # etcd's minimum TTL with default timings
        assert 0 < await client.lease_ttl(lease) <= 2
        await client.put(p + b"leased/x", b"1", lease=lease)
        await client.put(p + b"leased/y", b"2", lease=lease)
        assert (await client.get(p + b"leased/x")).lease == lease  # type: ignore[union-attr]
        assert await client.lease_keepalive(lease) == 2
        await _wait_for(lambda: len(events) >= 2, 5, "the two puts")
        await _wait_for(lambda: len(events) >= 4, 8, "the lease to expire")
    finally:
        await _stop(watch)
    assert [(e.kind, e.kv.key) for e in events] == [
        ("put", p + b"leased/x"), ("put", p + b"leased/y"),
        ("delete", p + b"leased/x"), ("delete", p + b"leased/y")]
    assert events[2].kv.value == b"" and events[2].kv.mod_revision > events[1].kv.mod_revision
    assert await client.lease_ttl(lease) == -1
    assert await client.lease_keepalive(lease) == 0
    with pytest.raises(EtcdLeaseNotFound):
        await client.put(p + b"leased/z", b"3", lease=lease)
    await client.lease_revoke(lease)  # already gone: fine
    assert [kv.key for kv in (await client.get_prefix(p))[0]] == [p + b"a", p + b"b", p + b"c"]
    assert await client.delete_prefix(p) == 3
    assert await client.delete(p + b"a") == 0


async def test_txn_compare_and_put(client: EtcdClient, etcd_prefix: str) -> None:
    k = (etcd_prefix + "node").encode()
    create = [compare_version(k, "==", 0)]
    first = await client.txn(create, [op_put(k, b"one")], [op_get(k)])
    assert first.succeeded and first.gets == ()
    again = await client.txn(create, [op_put(k, b"two")], [op_get(k)])
    assert not again.succeeded and again.gets[0][0].value == b"one"
    kv = again.gets[0][0]
    cas = await client.txn([compare_mod_revision(k, "==", kv.mod_revision)], [op_put(k, b"2")])
    assert cas.succeeded and cas.revision > kv.mod_revision
    stale = await client.txn([compare_mod_revision(k, "==", kv.mod_revision)], [op_put(k, b"x")])
    assert not stale.succeeded
    assert (await client.txn([compare_value(k, "==", b"2")], [op_delete_prefix(k)])).succeeded
    assert await client.get(k) is None


async def test_prefix_read_over_4mib(client: EtcdClient, etcd_prefix: str) -> None:
    p = etcd_prefix.encode()
    blob = b"x" * MIB  # etcd accepts requests up to 1.5 MiB
    await asyncio.gather(*(client.put(p + b"%d" % i, blob) for i in range(6)))
    kvs, _ = await client.get_prefix(p)
    assert len(kvs) == 6 and sum(len(kv.value) for kv in kvs) == 6 * MIB
    small = EtcdClient(_settings(*client.settings.etcd_endpoints,
                                 etcd_max_message_bytes=4 * MIB))
    await small.connect()
    try:
        with pytest.raises(EtcdError, match="RESOURCE_EXHAUSTED"):
            await small.get_prefix(p)
    finally:
        await small.close()
    assert await client.delete_prefix(p) == 6


async def test_failover_to_next_endpoint(etcd_endpoint: str, etcd_prefix: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    c = EtcdClient(_settings(dead, etcd_endpoint, etcd_connect_timeout_s=3))
    await c.connect()
    try:
        k = (etcd_prefix + "k").encode()
        await c.put(k, b"v")
        assert (await c.get(k)).value == b"v"  # type: ignore[union-attr]
    finally:
        await c.close()
    with pytest.raises(EtcdUnavailable, match=dead):
        await EtcdClient(_settings(dead, etcd_connect_timeout_s=0.5)).connect()


async def test_watch_resumes_across_etcd_restart(own_etcd: EmbeddedEtcd) -> None:
    c = EtcdClient(_settings(own_etcd.endpoint, etcd_call_timeout_s=3))
    await c.connect()
    events: list[WatchEvent] = []
    try:
        start = await c.revision() + 1
        watch = _start_watch(c, b"/w/", start, events)
        for i in range(5):
            await c.put(b"/w/%02d" % i, b"before")
        await _wait_for(lambda: len(events) == 5, 5, "events before the restart")
        lease = await c.lease_grant(20)
        assert await c.lease_keepalive(lease) == 20
        await asyncio.to_thread(own_etcd.restart)
        assert await c.lease_keepalive(lease) == 20  # a new keepalive stream, same lease
        for i in range(5, 10):  # written while the watch is still reconnecting
            await c.put(b"/w/%02d" % i, b"after")
        await _wait_for(lambda: len(events) >= 10, 15, "events after the restart")
        await asyncio.sleep(0.3)  # a duplicate would arrive now
        await _stop(watch)
    finally:
        await c.close()
    assert [e.kv.key for e in events] == [b"/w/%02d" % i for i in range(10)]
    revs = [e.kv.mod_revision for e in events]
    assert revs == sorted(set(revs)) and revs[0] == start


async def test_watch_from_compacted_revision_raises(own_etcd: EmbeddedEtcd) -> None:
    c = EtcdClient(_settings(own_etcd.endpoint))
    await c.connect()
    try:
        first = await c.put(b"/c/k", b"1")
        await c.put(b"/c/k", b"2")
        last = await c.put(b"/c/k", b"3")
        await c.compact(last)
        with pytest.raises(WatchCompacted) as info:
            async for _ in c.watch_prefix(b"/c/", first):
                pass
        assert info.value.compact_revision == last
        # the documented recovery: list, then watch from the listed revision + 1
        kvs, rev = await c.get_prefix(b"/c/")
        assert kvs[0].value == b"3"
        events: list[WatchEvent] = []
        watch = _start_watch(c, b"/c/", rev + 1, events)
        await c.put(b"/c/k", b"4")
        await _wait_for(lambda: len(events) == 1, 5, "the event after re-watch")
        assert _etcd_watchers(own_etcd) == 1
        await _stop(watch)  # cancelling the consumer ends the watch in etcd too
        await _wait_for(lambda: _etcd_watchers(own_etcd) == 0, 5, "etcd to drop the watcher")
    finally:
        await c.close()


async def test_paused_etcd_times_out_then_recovers(own_etcd: EmbeddedEtcd) -> None:
    timeout, attempts = 0.5, 3
    c = EtcdClient(_settings(own_etcd.endpoint, etcd_call_timeout_s=timeout,
                             etcd_retry_attempts=attempts))
    await c.connect()
    assert own_etcd.process is not None
    events: list[WatchEvent] = []
    try:
        rev = await c.put(b"/p/k", b"kept")
        lease = await c.lease_grant(30)
        assert await c.lease_keepalive(lease) == 30
        watch = _start_watch(c, b"/p/", rev + 1, events)
        await asyncio.sleep(0.2)
        own_etcd.process.signal(signal.SIGSTOP)
        try:
            await _wait_stopped(own_etcd.process.pid)
            t0 = time.monotonic()
            # concurrent keepalives queue for the one stream, each within its own deadline
            create = c.txn([compare_version(b"/p/t", "==", 0)], [op_put(b"/p/t", b"once")])
            results = await asyncio.gather(c.get(b"/p/k"), create, *(c.lease_keepalive(lease)
                                                                      for _ in range(3)),
                                           return_exceptions=True)
            elapsed = time.monotonic() - t0
            assert all(isinstance(r, EtcdUnavailable) for r in results), \
                "\n".join(f"{type(r).__name__}: {str(r)[:90]}" for r in results)
            assert own_etcd.endpoint in str(results[0])
            # attempts x deadline plus at most 0.6 s of backoff, plus slack for a loaded machine
            assert timeout * attempts - 0.1 <= elapsed < timeout * attempts + 3.0, elapsed
        finally:
            own_etcd.process.signal(signal.SIGCONT)
        assert (await c.get(b"/p/k")).value == b"kept"  # type: ignore[union-attr]
        assert await c.lease_keepalive(lease) == 30
        # the timed-out txn was not repeated (etcd may or may not have applied it on SIGCONT)
        created = await c.get(b"/p/t")
        assert created is None or created.version == 1
        await c.put(b"/p/after", b"1")
        await _wait_for(lambda: any(e.kv.key == b"/p/after" for e in events), 10,
                        "the watch to see the put after SIGCONT")
        await _stop(watch)
    finally:
        await c.close()
    assert [e.kv.key for e in events if e.kv.key != b"/p/t"] == [b"/p/after"]


def _thread_states(pid: int) -> list[str]:
    """The scheduler state letter of every thread of ``pid`` (from /proc)."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue
    return states


async def _wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Until every thread of ``pid`` is stopped: SIGSTOP is asynchronous, and a Go process's
    threads stop one by one, so a request sent at once may still be answered."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = _thread_states(pid)
        if states and all(st in ("T", "t") for st in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"etcd pid {pid} not stopped after {timeout_s} s: {states}")
        await asyncio.sleep(0.01)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certs(d: Path) -> None:
    """A throwaway CA, a server cert for 127.0.0.1 and a client cert, with the openssl CLI."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=kvroute-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, eku in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={eku}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=kvroute-test-{name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=d)


async def test_mtls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make throwaway certificates")
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_certs(certs)
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    etcd = EmbeddedEtcd(tmp_path / "etcd", client_scheme="https", health_ssl_context=ctx,
                        extra_args=(f"--cert-file={certs / 'server.pem'}",
                                    f"--key-file={certs / 'server.key'}",
                                    f"--trusted-ca-file={certs / 'ca.pem'}",
                                    "--client-cert-auth"))
    await asyncio.to_thread(etcd.start)
    try:
        tls = {"etcd_ca_file": str(certs / "ca.pem")}
        c = EtcdClient(_settings(etcd.endpoint, **tls, etcd_cert_file=str(certs / "client.pem"),
                                 etcd_key_file=str(certs / "client.key")))
        await c.connect()
        try:
            rev = await c.put(b"/tls/k", b"secret")
            kv = await c.get(b"/tls/k")
            assert kv is not None and kv.value == b"secret" and kv.mod_revision == rev
        finally:
            await c.close()
        for bad in (_settings(etcd.endpoint, **tls, etcd_connect_timeout_s=1),  # no client cert
                    _settings(etcd.endpoint, etcd_connect_timeout_s=1)):  # plaintext
            with pytest.raises(EtcdUnavailable):
                await EtcdClient(bad).connect()
    finally:
        await asyncio.to_thread(etcd.stop)


async def test_auth_token_is_refreshed(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                       ) -> None:
    etcdctl = Path(find_etcd_binary()).with_name("etcdctl")
    if not etcdctl.is_file():
        pytest.skip(f"no etcdctl next to {find_etcd_binary()} to enable auth with")
    etcd = EmbeddedEtcd(tmp_path / "etcd", extra_args=("--auth-token=simple",
                                                       "--auth-token-ttl=2"))
    await asyncio.to_thread(etcd.start)
    try:
        ctl = [str(etcdctl), f"--endpoints={etcd.endpoint}"]
        for cmd in (["user", "add", "root:pw", "--interactive=false"], ["auth", "enable"]):
            await asyncio.to_thread(subprocess.run, [*ctl, *cmd], check=True,
                                    capture_output=True, timeout=10)
        with pytest.raises(EtcdError, match="authentication failed"):
            await EtcdClient(_settings(etcd.endpoint, etcd_username="root",
                                       etcd_password="wrong")).connect()
        anonymous = EtcdClient(_settings(etcd.endpoint))
        await anonymous.connect()
        with pytest.raises(EtcdError, match=r"user name is empty|permission denied"):
            await anonymous.put(b"/auth/k", b"v")
        await anonymous.close()

        c = EtcdClient(_settings(etcd.endpoint, etcd_username="root", etcd_password="pw"))
        caplog.set_level(logging.INFO, logger="registry_service.store.etcd_client")
        await c.connect()
        events: list[WatchEvent] = []

        def logins() -> int:
            return sum("authenticated to etcd" in r.getMessage() for r in caplog.records)
        try:
            rev = await c.put(b"/auth/k", b"1")
            assert logins() == 1
            await asyncio.sleep(3.2)  # the simple token expires after 2 s unused
            assert (await c.get(b"/auth/k")).value == b"1"  # type: ignore[union-attr]
            assert logins() == 2, "a unary call did not replace the expired token"
            await asyncio.sleep(3.2)
            watch = _start_watch(c, b"/auth/", rev + 1, events)  # opened with a stale token
            await _wait_for(lambda: logins() == 3, 5, "the watch to replace the token")
            await c.put(b"/auth/k", b"2")
            await _wait_for(lambda: len(events) == 1, 10, "the watch opened with a stale token")
            await _stop(watch)
        finally:
            await c.close()
    finally:
        await asyncio.to_thread(etcd.stop)

