"""The etcd v3 client of kvroute: the only module that imports an etcd library (``aetcd``).

Choice and why. ``aetcd`` 1.0.0 is pinned, but only for its generated etcd v3 gRPC stubs
(``aetcd.rpc``: KVStub, LeaseStub, WatchStub, AuthStub, MaintenanceStub and the request
messages), which import fine with protobuf 7. ``aetcd.Client`` itself is not used: it always
opens an insecure channel (no TLS), talks to one endpoint, never refreshes its auth token
(calls fail with "invalid auth token" after etcd's token TTL), does not resume a watch after an
etcd restart, has no deadline unless each call passes ``timeout=`` (a paused etcd hangs calls
forever), sets no gRPC keepalive and keeps the 4 MiB receive limit. ``etcd3aio`` was rejected
because it prepends its own folder to ``sys.path`` and imports a top-level ``google.api`` (a
module-name clash risk); ``etcd-client-py`` returns no lease ids and takes no lease on put;
``etcd3`` does not import with protobuf >= 4.

So this module runs the stubs over its own ``grpc.aio`` channels and adds what we need:
TLS / mTLS, several endpoints with round-robin failover, a deadline on every unary call,
bounded jittered retries (tenacity) on transient errors, transparent re-authentication when the
token expires, gRPC keepalive, a raised message limit, one reused lease-keepalive stream, and
watches that reconnect forever (with backoff) and resume from the last seen revision + 1, so no
event is lost or duplicated; a compacted start revision raises :class:`WatchCompacted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aetcd import rpc
from grpc.aio import EOF  # type: ignore[attr-defined]
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from registry_service.store.etcd_settings import (
    Compare,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdSettings,
    EtcdUnavailable,
    KeyValue,
    Op,
    TxnResult,
    WatchCompacted,
    WatchEvent,
    compare_create_revision,
    compare_lease,
    compare_mod_revision,
    compare_value,
    compare_version,
    op_delete,
    op_delete_prefix,
    op_get,
    op_put,
    prefix_range_end,
)

__all__ = [
    "Compare", "EtcdClient", "EtcdError", "EtcdLeaseNotFound", "EtcdSettings", "EtcdUnavailable",
    "KeyValue", "Op", "TxnResult", "WatchCompacted", "WatchEvent", "compare_create_revision",
    "compare_lease", "compare_mod_revision", "compare_value", "compare_version", "op_delete",
    "op_delete_prefix", "op_get", "op_put", "prefix_range_end",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

_AUTH_EXPIRED = ("invalid auth token", "auth token is expired", "revision of auth store is old")
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_CMP_TARGET = {"version": rpc.Compare.VERSION, "create_revision": rpc.Compare.CREATE,
               "mod_revision": rpc.Compare.MOD, "value": rpc.Compare.VALUE,
               "lease": rpc.Compare.LEASE}
_CMP_FIELD = {"version": "version", "create_revision": "create_revision",
              "mod_revision": "mod_revision", "value": "value", "lease": "lease"}
_CMP_OP = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL, "<": rpc.Compare.LESS,
           ">": rpc.Compare.GREATER}


class _Transient(Exception):
    """A failure worth retrying that is not an AioRpcError (stream ended, local timeout)."""


class _Stubs:
    """The etcd service stubs bound to one endpoint's channel."""

    def __init__(self, index: int, channel: grpc.aio.Channel) -> None:
        self.index = index
        self.channel = channel
        self.kv = rpc.KVStub(channel)
        self.lease = rpc.LeaseStub(channel)
        self.watch = rpc.WatchStub(channel)
        self.auth = rpc.AuthStub(channel)
        self.maintenance = rpc.MaintenanceStub(channel)


def _is_auth_expired(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and any(
        s in (exc.details() or "") for s in _AUTH_EXPIRED)


def _kv(m: Any) -> KeyValue:
    return KeyValue(key=m.key, value=m.value, create_revision=m.create_revision,
                    mod_revision=m.mod_revision, version=m.version, lease=m.lease)


class EtcdClient:
    """An asyncio etcd v3 client. ``await connect()`` first, ``await close()`` at the end."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self._endpoints = settings.endpoints
        self._stubs: list[_Stubs | None] = [None] * len(self._endpoints)
        self._current = 0
        self._token = ""
        self._auth_lock = asyncio.Lock()
        self._ka_lock = asyncio.Lock()
        self._ka_call: Any = None
        self._ka_index = -1
        self._closed = False

    # ---- channels, auth, retries ------------------------------------------------------
    def _open(self, index: int) -> _Stubs:
        s = self.settings
        ka_ms = int(s.etcd_keepalive_s * 1000)
        opts: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", ka_ms),
            ("grpc.keepalive_timeout_ms", ka_ms),
            ("grpc.keepalive_permit_without_calls", 0),  # etcd GOAWAYs idle pingers
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", s.etcd_max_message_bytes),
            ("grpc.max_send_message_length", s.etcd_max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        target = self._endpoints[index]
        if not s.tls_enabled:
            channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            if s.etcd_server_name:
                opts.append(("grpc.ssl_target_name_override", s.etcd_server_name))
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(s.etcd_ca_file).read_bytes() if s.etcd_ca_file else None,
                private_key=Path(s.etcd_key_file).read_bytes() if s.etcd_key_file else None,
                certificate_chain=(Path(s.etcd_cert_file).read_bytes()
                                   if s.etcd_cert_file else None))
            channel = grpc.aio.secure_channel(target, creds, options=opts)
        return _Stubs(index, channel)

    def _pick(self) -> _Stubs:
        if self._closed:
            raise EtcdUnavailable("etcd client is closed")
        stubs = self._stubs[self._current]
        if stubs is None:
            stubs = self._stubs[self._current] = self._open(self._current)
        return stubs

    def _failover(self, failed: int) -> None:
        """Move to the next endpoint, unless another caller already moved on."""
        if len(self._endpoints) > 1 and self._current == failed:
            self._current = (failed + 1) % len(self._endpoints)
            log.warning("etcd endpoint %s failing; trying %s", self._endpoints[failed],
                        self._endpoints[self._current])

    def _metadata(self) -> Metadata:
        return (("token", self._token),) if self._token else ()

    async def _authenticate(self, stubs: _Stubs, failed_token: str | None) -> None:
        """Fetch a new token, unless another task already replaced ``failed_token``."""
        async with self._auth_lock:
            if failed_token is not None and self._token != failed_token:
                return
            resp = await stubs.auth.Authenticate(
                rpc.AuthenticateRequest(name=self.settings.etcd_username,
                                        password=self.settings.etcd_password),
                timeout=self.settings.etcd_call_timeout_s)
            self._token = resp.token
            log.info("authenticated to etcd as %s", self.settings.etcd_username)

    def _retryable(self, retry_deadline: bool) -> Callable[[BaseException], bool]:
        def check(exc: BaseException) -> bool:
            if isinstance(exc, _Transient):
                return retry_deadline
            if not isinstance(exc, grpc.aio.AioRpcError):
                return False
            if _is_auth_expired(exc):
                return True
            return exc.code() == grpc.StatusCode.UNAVAILABLE or (
                retry_deadline and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
        return check

    async def _call(self, what: str, fn: Callable[[_Stubs, Metadata, float], Awaitable[T]],
                    *, retry_deadline: bool = True) -> T:
        """Run ``fn`` with a deadline, retrying transient failures; raise our error types.

        ``retry_deadline=False`` for non-idempotent writes (txn): a timed-out txn may have been
        applied, so it is reported, not repeated.
        """
        s = self.settings
        retrying = AsyncRetrying(
            stop=stop_after_attempt(s.etcd_retry_attempts),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(self._retryable(retry_deadline)), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    stubs = self._pick()
                    token = self._token
                    try:
                        return await fn(stubs, self._metadata(), s.etcd_call_timeout_s)
                    except grpc.aio.AioRpcError as exc:
                        if _is_auth_expired(exc) and s.etcd_username:
                            await self._authenticate(stubs, token)
                        elif exc.code() in _TRANSIENT:
                            self._failover(stubs.index)
                        raise
                    except (_Transient, TimeoutError) as exc:
                        self._failover(stubs.index)
                        raise _Transient(str(exc) or "local deadline") from exc
        except grpc.aio.AioRpcError as exc:
            raise self._translate(what, exc) from exc
        except _Transient as exc:
            raise EtcdUnavailable(f"etcd {what} failed at {', '.join(self._endpoints)} after "
                                  f"{s.etcd_retry_attempts} attempts: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _translate(self, what: str, exc: grpc.aio.AioRpcError) -> Exception:
        code, details = exc.code(), exc.details() or ""
        where = ", ".join(self._endpoints)
        if code in _TRANSIENT or _is_auth_expired(exc):
            return EtcdUnavailable(
                f"etcd {what} failed at {where} after {self.settings.etcd_retry_attempts} "
                f"attempts (deadline {self.settings.etcd_call_timeout_s}s each): "
                f"{code.name}: {details}")
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
            return EtcdLeaseNotFound(f"etcd {what}: {details}")
        return EtcdError(f"etcd {what} rejected by {where}: {code.name}: {details}")

    # ---- lifecycle --------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the channel, authenticate if configured, and check an endpoint answers."""
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.etcd_connect_timeout_s
        errors: list[str] = []
        for i in range(len(self._endpoints)):
            self._current = i
            stubs = self._pick()
            left = max(0.05, deadline - loop.time()) / (len(self._endpoints) - i)
            try:
                await stubs.maintenance.Status(rpc.StatusRequest(), timeout=left,
                                               wait_for_ready=True)
                if s.etcd_username:
                    await self._authenticate(stubs, None)
                return
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{self._endpoints[i]}: {exc.code().name}: {exc.details()}")
                if exc.code() not in _TRANSIENT:
                    raise self._translate("connect", exc) from exc
        raise EtcdUnavailable(f"no etcd endpoint answered within {s.etcd_connect_timeout_s}s: "
                              f"{'; '.join(errors)}")

    async def close(self) -> None:
        """Close the keepalive stream and every channel."""
        self._closed = True
        if self._ka_call is not None:
            self._ka_call.cancel()
            self._ka_call = None
        for i, stubs in enumerate(self._stubs):
            if stubs is not None:
                await stubs.channel.close(None)
                self._stubs[i] = None

    async def __aenter__(self) -> EtcdClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- KV -----------------------------------------------------------------------------
    async def get(self, key: bytes) -> KeyValue | None:
        """The key, or None when absent."""
        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.kv.Range(rpc.RangeRequest(key=key), timeout=t, metadata=md)
        resp = await self._call("get", go)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` sorted by key, and the store revision of the read."""
        req = rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix),
                               sort_order=rpc.RangeRequest.ASCEND,
                               sort_target=rpc.RangeRequest.KEY)

        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.kv.Range(req, timeout=t, metadata=md)
        resp = await self._call("get_prefix", go)
        return [_kv(m) for m in resp.kvs], int(resp.header.revision)

    async def revision(self) -> int:
        """The current store revision."""
        p = self.settings.etcd_prefix.encode()
        req = rpc.RangeRequest(key=p, range_end=prefix_range_end(p), count_only=True)

        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.kv.Range(req, timeout=t, metadata=md)
        return int((await self._call("revision", go)).header.revision)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write ``key``; returns the revision of the write."""
        req = rpc.PutRequest(key=key, value=value, lease=lease)

        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.kv.Put(req, timeout=t, metadata=md)
        return int((await self._call("put", go)).header.revision)

    async def _delete(self, what: str, req: Any) -> int:
        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.kv.DeleteRange(req, timeout=t, metadata=md)
        return int((await self._call(what, go)).deleted)

    async def delete(self, key: bytes) -> int:
        """Delete one key; returns how many were deleted (0 or 1)."""
        return await self._delete("delete", rpc.DeleteRangeRequest(key=key))

    async def delete_prefix(self, prefix: bytes) -> int:
        """Delete every key under ``prefix``; returns how many were deleted."""
        return await self._delete("delete_prefix", rpc.DeleteRangeRequest(
            key=prefix, range_end=prefix_range_end(prefix)))

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        """If every compare holds run ``success`` else ``failure``, atomically.

        Retried on UNAVAILABLE only; a txn that timed out may have been applied, so it raises
        EtcdUnavailable instead of running twice.
        """
        req = rpc.TxnRequest(compare=[_compare_pb(c) for c in compares],
                             success=[_op_pb(o) for o in success],
                             failure=[_op_pb(o) for o in failure])

        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.kv.Txn(req, timeout=t, metadata=md)
        resp = await self._call("txn", go, retry_deadline=False)
        gets = tuple(tuple(_kv(m) for m in r.response_range.kvs)
                     for r in resp.responses if r.WhichOneof("response") == "response_range")
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), gets)

    async def compact(self, revision: int) -> None:
        """Compact the history up to ``revision`` (tests and maintenance)."""
        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.kv.Compact(rpc.CompactionRequest(revision=revision, physical=True),
                                       timeout=t, metadata=md)
        await self._call("compact", go)

    # ---- leases -------------------------------------------------------------------------
    async def lease_grant(self, ttl_s: int) -> int:
        """Grant a lease of ``ttl_s`` seconds; returns its id."""
        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl_s), timeout=t,
                                             metadata=md)
        resp = await self._call("lease_grant", go)
        if resp.error:
            raise EtcdError(f"etcd lease_grant: {resp.error}")
        return int(resp.ID)

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease (deleting its keys); a lease already gone is fine."""
        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), timeout=t,
                                              metadata=md)
        with contextlib.suppress(EtcdLeaseNotFound):
            await self._call("lease_revoke", go)

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on the lease, -1 when it is gone."""
        async def go(st: _Stubs, md: Metadata, t: float) -> Any:
            return await st.lease.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=lease_id),
                                                  timeout=t, metadata=md)
        return int((await self._call("lease_ttl", go)).TTL)

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease once; returns its TTL, 0 when it is gone. Uses one shared stream."""
        async def go(st: _Stubs, md: Metadata, t: float) -> int:
            async with self._ka_lock:
                call = self._ka_call
                if call is None or call.done() or self._ka_index != st.index:
                    if call is not None:
                        call.cancel()
                    call = self._ka_call = st.lease.LeaseKeepAlive(metadata=md)
                    self._ka_index = st.index
                try:
                    async with asyncio.timeout(t):
                        await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                        resp = await call.read()
                    if resp is EOF:
                        raise _Transient("etcd closed the lease keepalive stream")
                    if lease_id != resp.ID:
                        raise _Transient(f"keepalive answer for lease {resp.ID}, "
                                         f"expected {lease_id}")
                except BaseException:
                    call.cancel()
                    self._ka_call = None
                    raise
                return max(0, int(resp.TTL))
        return await self._call("lease_keepalive", go)

    # ---- watch --------------------------------------------------------------------------
    async def watch_prefix(self, prefix: bytes, start_revision: int,
                           ) -> AsyncIterator[list[WatchEvent]]:
        """Yield batches of events under ``prefix`` from ``start_revision`` on, in order.

        Reconnects (with backoff, until cancelled) on a failed channel or etcd restart and
        resumes from the last seen revision + 1: no event is lost or repeated. Raises
        WatchCompacted when the revision to resume from was compacted. ``start_revision`` 0
        means "from now".
        """
        next_rev = start_revision
        failures = 0
        reauthed = False
        while True:
            stubs = self._pick()
            call = stubs.watch.Watch(metadata=self._metadata())
            token = self._token
            try:
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=prefix, range_end=prefix_range_end(prefix), start_revision=next_rev,
                    progress_notify=True)))
                while True:
                    resp = await call.read()
                    if resp is EOF:
                        raise _Transient("etcd closed the watch stream")
                    if resp.compact_revision:
                        raise WatchCompacted(int(resp.compact_revision))
                    if resp.canceled:
                        reason = resp.cancel_reason or "no reason"
                        if ("permission denied" in reason and self.settings.etcd_username
                                and not reauthed):
                            reauthed = True  # a token that expired while we were away
                            await self._authenticate(stubs, token)
                            raise _Transient(reason)
                        raise EtcdError(f"etcd cancelled the watch on {prefix!r}: {reason}")
                    if resp.created:
                        failures, reauthed = 0, False
                        if next_rev == 0:
                            next_rev = int(resp.header.revision) + 1
                    if resp.events:
                        batch = [_event(e) for e in resp.events]
                        next_rev = batch[-1].kv.mod_revision + 1
                        yield batch
                    elif not resp.created and resp.header.revision >= next_rev:
                        next_rev = int(resp.header.revision) + 1  # progress notification
            except (_Transient, grpc.aio.AioRpcError) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and _is_auth_expired(exc):
                    await self._authenticate(stubs, token)
                elif isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in (
                        *_TRANSIENT, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.INTERNAL):
                    raise self._translate("watch", exc) from exc
                failures += 1
                self._failover(stubs.index)
                delay = min(2.0, 0.1 * 2 ** min(failures, 5))
                log.warning("etcd watch on %r interrupted (%s); resuming from revision %d in "
                            "%.1fs", prefix, exc, next_rev, delay)
                await asyncio.sleep(delay)
            finally:
                call.cancel()


def _event(e: Any) -> WatchEvent:
    return WatchEvent("delete" if e.type == rpc.Event.DELETE else "put", _kv(e.kv))


def _compare_pb(c: Compare) -> Any:
    pb = rpc.Compare(key=c.key, target=_CMP_TARGET[c.target], result=_CMP_OP[c.op])
    setattr(pb, _CMP_FIELD[c.target], c.value)
    return pb


def _op_pb(o: Op) -> Any:
    if o.kind == "put":
        return rpc.RequestOp(request_put=rpc.PutRequest(key=o.key, value=o.value, lease=o.lease))
    if o.kind == "delete":
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
            key=o.key, range_end=o.range_end))
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=o.key, range_end=o.range_end))
