"""The hub directory on etcd: ``P hubs/<hub_id>`` under the advertising replica's own lease
(see :mod:`registry_service.store.hubs`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from kvroute.aio import cancel_and_wait
from registry_service.store.etcd_client import EtcdClient, EtcdError, WatchCompacted
from registry_service.store.hubs import HubDirectory, HubRecord

log = logging.getLogger(__name__)


class EtcdHubDirectory(HubDirectory):
    """Hub records in etcd, each on its replica's lease."""

    def __init__(self, client: EtcdClient, prefix: bytes) -> None:
        self._client = client
        self._prefix = prefix + b"hubs/"
        self._task: asyncio.Task[None] | None = None
        self._lease = 0

    def _key(self, hub_id: str) -> bytes:
        return self._prefix + hub_id.encode()

    async def advertise(self, record: HubRecord, ttl_s: int) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._keep(record, ttl_s), name="hub-advertise")

    async def _keep(self, record: HubRecord, ttl_s: int) -> None:
        failures = 0
        while True:
            try:
                self._lease = await self._client.lease_grant(ttl_s)
                await self._client.put(self._key(record.hub_id), record.encode(), self._lease)
                if failures:
                    log.info("route share hub %s advertised again at %s", record.hub_id,
                             record.address)
                failures = 0
                while True:
                    await asyncio.sleep(ttl_s / 3)
                    if await self._client.lease_keepalive(self._lease) <= 0:
                        break
                log.warning("route share hub %s: its etcd lease expired (etcd unreachable for "
                            "over %d s?); advertising it again", record.hub_id, ttl_s)
            except (EtcdError, TimeoutError, OSError) as exc:
                failures += 1
                delay = min(ttl_s / 3, 0.2 * 2 ** min(failures, 5))
                log.warning("route share hub %s: cannot advertise in etcd (%s); peer registries "
                            "stop relaying to this one once its record expires; retrying in "
                            "%.1fs", record.hub_id, exc, delay)
                await asyncio.sleep(delay)

    async def withdraw(self) -> None:
        task, self._task = self._task, None
        try:
            await cancel_and_wait(task)
        finally:  # also when the caller is cancelled while waiting
            lease, self._lease = self._lease, 0
            if lease:
                with contextlib.suppress(EtcdError, TimeoutError, OSError):
                    await self._client.lease_revoke(lease)  # deletes the record

    def _parse(self, key: bytes, value: bytes) -> HubRecord | None:
        try:
            rec = HubRecord.decode(value)
        except ValueError as exc:
            log.warning("ignoring malformed hub record %r: %s", key[:200], exc)
            return None
        return rec

    async def follow(self) -> AsyncIterator[dict[str, HubRecord]]:
        failures = 0
        while True:
            try:
                kvs, revision = await self._client.get_prefix(self._prefix)
                hubs = {r.hub_id: r for r in (self._parse(kv.key, kv.value) for kv in kvs)
                        if r is not None}
                failures = 0
                yield dict(hubs)
                async for batch in self._client.watch_prefix(self._prefix, revision + 1):
                    for ev in batch:
                        hub_id = ev.kv.key[len(self._prefix):].decode(errors="replace")
                        if ev.kind == "delete":
                            hubs.pop(hub_id, None)
                        elif (rec := self._parse(ev.kv.key, ev.kv.value)) is not None:
                            hubs[rec.hub_id] = rec
                    yield dict(hubs)
            except WatchCompacted:
                log.info("hub directory watch compacted away; listing again")
            except (EtcdError, TimeoutError, OSError) as exc:
                failures += 1
                delay = min(5.0, 0.2 * 2 ** min(failures, 5))
                log.warning("following the hub directory in etcd failed (%s); listing again in "
                            "%.1fs (relay links stay as they are meanwhile)", exc, delay)
                await asyncio.sleep(delay)
