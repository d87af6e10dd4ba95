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
from typing import Any, TypeVar

import grpc
from aetcd import rpc
from grpc.aio import EOF  # type: ignore[attr-defined]

from registry_service.store.etcd_channel import (
    TRANSIENT,
    EndpointPool,
    Transient,
    is_auth_expired,
    translate,
    with_retries,
)
from registry_service.store.etcd_errors import *  # noqa: F403  (re-exported API errors)
from registry_service.store.etcd_errors import (
    EtcdError,
    EtcdLeaseNotFound,
    EtcdUnavailable,
    WatchCompacted,
)
from registry_service.store.etcd_settings import *  # noqa: F403  (re-exported settings)
from registry_service.store.etcd_settings import EtcdSettings
from registry_service.store.etcd_types import *  # noqa: F403  (re-exported API types)
from registry_service.store.etcd_types import (
    Compare,
    KeyValue,
    Op,
    TxnResult,
    WatchEvent,
    prefix_range_end,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
CallOptions = dict[str, Any]
"""timeout, metadata and wait_for_ready of one unary call."""

_CMP_TARGET = {"version": rpc.Compare.VERSION, "create_revision": rpc.Compare.CREATE,
               "mod_revision": rpc.Compare.MOD, "value": rpc.Compare.VALUE,
               "lease": rpc.Compare.LEASE}
_CMP_OP = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL, "<": rpc.Compare.LESS,
           ">": rpc.Compare.GREATER}


class _Stubs:
    """The etcd service stubs bound to one endpoint's channel."""

    def __init__(self, index: int, channel: grpc.aio.Channel) -> None:
        self.index = index
        self.kv = rpc.KVStub(channel)
        self.lease = rpc.LeaseStub(channel)
        self.watch = rpc.WatchStub(channel)
        self.auth = rpc.AuthStub(channel)
        self.maintenance = rpc.MaintenanceStub(channel)


def _kv(m: Any) -> KeyValue:
    return KeyValue(m.key, m.value, m.create_revision, m.mod_revision, m.version, m.lease)


class EtcdClient:
    """An asyncio etcd v3 client. ``await connect()`` first, ``await close()`` at the end.

    Safe for many concurrent tasks on one event loop.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self._pool = EndpointPool(settings)
        self._stubs: dict[int, _Stubs] = {}
        self._token = ""
        self._auth_lock = asyncio.Lock()
        self._ka_lock = asyncio.Lock()
        self._ka_call: Any = None
        self._ka_key: tuple[int, str] = (-1, "")  # endpoint and token the stream was opened with
        # One endpoint: wait (within the deadline) for the channel to reconnect, e.g. across an
        # etcd restart. Several: fail fast so the next endpoint is tried.
        self._wait_for_ready = len(settings.endpoints) == 1

    # ---- channels, auth, retries ------------------------------------------------------
    def _pick(self, index: int | None = None) -> _Stubs:
        i = self._pool.current if index is None else index
        channel = self._pool.channel(i)
        stubs = self._stubs.get(i)
        if stubs is None:
            stubs = self._stubs[i] = _Stubs(i, channel)
        return stubs

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

    async def _call(self, what: str, fn: Callable[[_Stubs, CallOptions], Awaitable[T]],
                    *, idempotent: bool = True) -> T:
        """Run ``fn(stubs, call_options)`` with a deadline and bounded retries.

        ``idempotent=False`` for txn: a txn that timed out or lost its connection may have been
        applied, so it is reported (EtcdUnavailable), not run twice. Puts and deletes are
        repeated (same end state; a repeated delete may report 0 deleted), and so are lease
        grants (a lease granted by a lost attempt just expires).
        """
        async def attempt() -> T:
            stubs = self._pick()
            token = self._token
            try:
                return await fn(stubs, {"timeout": self.settings.etcd_call_timeout_s,
                                        "metadata": self._metadata(),
                                        "wait_for_ready": self._wait_for_ready})
            except grpc.aio.AioRpcError as exc:
                if is_auth_expired(exc) and self.settings.etcd_username:
                    await self._authenticate(stubs, token)
                elif exc.code() in TRANSIENT:
                    self._pool.failover(stubs.index)
                raise
            except (Transient, TimeoutError) as exc:
                self._pool.failover(stubs.index)
                raise Transient(str(exc) or "no answer within the deadline") from exc
        return await with_retries(self.settings, what, attempt, idempotent=idempotent)

    # ---- lifecycle --------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the channel, check an endpoint answers (within the connect timeout, trying
        each endpoint in turn) and authenticate if a username is set."""
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.etcd_connect_timeout_s
        errors: dict[str, str] = {}
        while True:
            for i in range(len(s.endpoints)):
                stubs = self._pick(i)
                try:
                    await stubs.maintenance.Status(
                        rpc.StatusRequest(), wait_for_ready=self._wait_for_ready,
                        timeout=max(0.05, min(s.etcd_call_timeout_s, deadline - loop.time())))
                    self._pool.current = i
                    if s.etcd_username:
                        await self._authenticate(stubs, None)
                    return
                except grpc.aio.AioRpcError as exc:
                    errors[s.endpoints[i]] = f"{exc.code().name}: {exc.details()}"
                    if exc.code() not in TRANSIENT:
                        raise translate(s, "connect", exc) from exc
            if loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.2, deadline - loop.time()))
        raise EtcdUnavailable(f"no etcd endpoint answered within {s.etcd_connect_timeout_s}s: "
                              + "; ".join(f"{ep}: {e}" for ep, e in errors.items()))

    async def close(self) -> None:
        """Close the keepalive stream and every channel (ending open watches)."""
        if self._ka_call is not None:
            self._ka_call.cancel()
            self._ka_call = None
        self._stubs.clear()
        await self._pool.close()

    async def __aenter__(self) -> EtcdClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- KV -----------------------------------------------------------------------------
    async def get(self, key: bytes) -> KeyValue | None:
        """The key, or None when absent."""
        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.kv.Range(rpc.RangeRequest(key=key), **kw)
        resp = await self._call("get", go)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` sorted by key, and the store revision of the read."""
        # etcd returns a range in key order already; asking it to sort costs ~1 ms/1k keys.
        req = rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix))

        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.kv.Range(req, **kw)
        resp = await self._call("get_prefix", go)
        return [_kv(m) for m in resp.kvs], int(resp.header.revision)

    async def revision(self) -> int:
        """The current store revision."""
        # one-key lookup (cheap whatever the prefix holds); only the header is used
        req = rpc.RangeRequest(key=self.settings.etcd_prefix.encode(), count_only=True)

        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.kv.Range(req, **kw)
        return int((await self._call("revision", go)).header.revision)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write ``key``; returns the revision of the write."""
        req = rpc.PutRequest(key=key, value=value, lease=lease)

        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.kv.Put(req, **kw)
        return int((await self._call("put", go)).header.revision)

    async def _delete(self, what: str, req: Any) -> int:
        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.kv.DeleteRange(req, **kw)
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

        Retried only when etcd surely did not get it (no connection, expired token); a txn
        that timed out or lost its connection may have been applied, so it raises
        EtcdUnavailable instead of running twice: re-read and decide.
        """
        req = rpc.TxnRequest(compare=[_compare_pb(c) for c in compares],
                             success=[_op_pb(o) for o in success],
                             failure=[_op_pb(o) for o in failure])

        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.kv.Txn(req, **kw)
        resp = await self._call("txn", go, idempotent=False)
        gets = tuple(tuple(_kv(m) for m in r.response_range.kvs)
                     for r in resp.responses if r.WhichOneof("response") == "response_range")
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), gets)

    async def compact(self, revision: int) -> None:
        """Compact the history up to ``revision`` (tests and maintenance)."""
        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.kv.Compact(rpc.CompactionRequest(revision=revision, physical=True),
                                       **kw)
        await self._call("compact", go)

    # ---- leases -------------------------------------------------------------------------
    async def lease_grant(self, ttl_s: int) -> int:
        """Grant a lease of ``ttl_s`` seconds; returns its id."""
        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.lease.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl_s), **kw)
        resp = await self._call("lease_grant", go)
        if resp.error:
            raise EtcdError(f"etcd lease_grant: {resp.error}")
        return int(resp.ID)

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease (deleting its keys); a lease already gone is fine."""
        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), **kw)
        with contextlib.suppress(EtcdLeaseNotFound):
            await self._call("lease_revoke", go)

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on the lease, -1 when it is gone."""
        async def go(st: _Stubs, kw: CallOptions) -> Any:
            return await st.lease.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=lease_id),
                                                  **kw)
        return int((await self._call("lease_ttl", go)).TTL)

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease once; returns its TTL, 0 when it is gone. Uses one shared stream
        (one request/answer at a time; waiting for the stream counts against the deadline)."""
        async def go(st: _Stubs, kw: CallOptions) -> int:
            async with asyncio.timeout(kw["timeout"]), self._ka_lock:
                call = self._ka_call
                if (call is None or call.done() or self._ka_key != (st.index, self._token)):
                    if call is not None:
                        call.cancel()
                    call = self._ka_call = st.lease.LeaseKeepAlive(metadata=kw["metadata"])
                    self._ka_key = (st.index, self._token)
                try:
                    await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                    resp = await call.read()
                    if resp is EOF:
                        raise Transient("etcd closed the lease keepalive stream")
                    if lease_id != resp.ID:
                        raise Transient(f"keepalive answer for lease {resp.ID}, "
                                        f"expected {lease_id}")
                except BaseException as exc:
                    call.cancel()
                    self._ka_call = None
                    if isinstance(exc, (asyncio.InvalidStateError, grpc.aio.UsageError)):
                        raise Transient(f"lease keepalive stream: {exc!r}") from exc
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
                    key=prefix, range_end=prefix_range_end(prefix), start_revision=next_rev)))
                while True:
                    resp = await call.read()
                    if resp is EOF:
                        raise Transient("etcd closed the watch stream")
                    if resp.compact_revision:
                        raise WatchCompacted(int(resp.compact_revision))
                    if resp.canceled:
                        reason = resp.cancel_reason or "no reason given"
                        if "permission denied" in reason:
                            if reauthed or not self.settings.etcd_username:
                                raise EtcdError(f"etcd refused the watch on {prefix!r}: "
                                                f"{reason}")
                            reauthed = True  # the token may have expired: try a fresh one
                            await self._authenticate(stubs, token)
                        raise Transient(f"etcd cancelled the watch: {reason}")
                    if resp.created:
                        failures, reauthed = 0, False
                        if next_rev == 0:
                            next_rev = int(resp.header.revision) + 1
                    if resp.events:
                        batch = [_event(e) for e in resp.events]
                        next_rev = batch[-1].kv.mod_revision + 1
                        yield batch
            except (Transient, grpc.aio.AioRpcError) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and is_auth_expired(exc):
                    await self._authenticate(stubs, token)
                elif isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in (
                        *TRANSIENT, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.INTERNAL):
                    raise translate(self.settings, "watch", exc) from exc
                if self._pool.closed:
                    raise EtcdUnavailable("etcd client closed under a watch") from exc
                failures += 1
                self._pool.failover(stubs.index)
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
    setattr(pb, c.target, c.value)  # the oneof field is named like the target
    return pb


def _op_pb(o: Op) -> Any:
    if o.kind == "put":
        return rpc.RequestOp(request_put=rpc.PutRequest(key=o.key, value=o.value, lease=o.lease))
    if o.kind == "delete":
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
            key=o.key, range_end=o.range_end))
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=o.key, range_end=o.range_end))
