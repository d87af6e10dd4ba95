"""The RouteShare relay between registry replicas (issue 19).

Without it, router replicas whose ``RouteShare.Exchange`` streams landed on different registry
pods form separate sharing groups. With it, every registry replica:

1. advertises its hub (instance id, ``--share-relay-advertise`` address) in the store's hub
   directory (etcd ``P hubs/<hub_id>`` under a lease of its own, like a node record), and
   withdraws it when it drains;
2. follows the directory and keeps one :class:`~registry_service.share_relay_link.RelayLink`
   to every other hub, started when a hub appears, restarted when its address changes,
   stopped when its record goes (lease expiry or withdrawal);
3. sends on every link only the deltas of its OWN directly connected replicas (the hub's
   :attr:`~registry_service.route_share.RouteShareHub.relay_out`), each tagged with its origin
   replica and hub. What a hub receives from a peer goes to its own replicas only, never on to
   another hub: a full mesh, one hop, no loops, no duplicates.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from kvroute.aio import cancel_and_wait
from kvroute.settings import TLSSettings
from kvroute.v1 import route_share_pb2 as pb
from registry_service.relay_settings import RelaySettings
from registry_service.route_share import RouteShareHub
from registry_service.share_relay_link import RelayLink, RelayMetrics
from registry_service.store.hubs import HubDirectory, HubRecord

log = logging.getLogger(__name__)


class ShareRelay:
    """Keeps this hub advertised and linked to every peer hub of the directory."""

    def __init__(self, hub: RouteShareHub, directory: HubDirectory, own: HubRecord,
                 settings: RelaySettings, tls: TLSSettings,
                 metrics: RelayMetrics | None = None) -> None:
        self.hub = hub
        self.directory = directory
        self.own = own
        self.settings = settings
        self.tls = tls
        self.links: dict[str, RelayLink] = {}
        self._task: asyncio.Task[None] | None = None
        self.metrics = metrics or RelayMetrics()
        self.metrics.links = self.links.values

    def publish(self, msg: pb.RouteShareMessage) -> None:
        """Send a message of this hub's own replicas to every peer hub."""
        for link in self.links.values():
            link.send(msg)

    async def start(self) -> None:
        """Advertise this hub and follow the directory (in the background)."""
        self.hub.relay_out = self.publish
        await self.directory.advertise(self.own, self.settings.share_relay_ttl_s)
        self._task = asyncio.create_task(self._follow(), name="share-relay-directory")
        log.info("route share relay: hub %s advertised at %s; relaying to every other registry "
                 "replica found in etcd", self.own.hub_id, self.own.address)

    async def stop(self) -> None:
        """Withdraw this hub (peers stop dialling it at once) and close every link."""
        self.hub.relay_out = None
        task, self._task = self._task, None
        try:
            await self.directory.withdraw()
        finally:  # each step also when the caller is cancelled during an earlier one
            try:
                await cancel_and_wait(task)  # the follower: it opens and closes links
            finally:
                links = list(self.links.values())
                self.links.clear()
                await asyncio.gather(*(link.stop() for link in links))

    async def _follow(self) -> None:
        while True:
            try:
                async for hubs in self.directory.follow():
                    await self._reconcile(hubs)
            except Exception:  # a bug here must not freeze the relay's view of its peers
                log.exception("route share relay: following the hub directory failed; "
                              "following it again in 1 s (links stay as they are)")
                await asyncio.sleep(1.0)

    async def _reconcile(self, hubs: dict[str, HubRecord]) -> None:
        s = self.settings
        for hub_id, link in list(self.links.items()):
            rec = hubs.get(hub_id)
            if rec is None or rec.address != link.peer.address:
                log.info("route share relay: hub %s (%s) %s; closing its link", hub_id,
                         link.peer.replica_id, "left" if rec is None else "moved")
                del self.links[hub_id]
                await link.stop()
        for hub_id, rec in hubs.items():
            if hub_id == self.own.hub_id or hub_id in self.links:
                continue
            if rec.address == self.own.address:
                log.warning("route share relay: hub %s (%s) advertises this replica's own "
                            "address %s: a restarted replica whose old record has not expired "
                            "yet, or two replicas sharing --share-relay-advertise; not "
                            "relaying to it", hub_id, rec.replica_id, rec.address)
                continue
            link = RelayLink(self.own, rec, self.tls, self.metrics,
                             timeout_s=s.share_relay_timeout_s,
                             retry_max_s=s.share_relay_retry_max_s,
                             max_queued=s.share_relay_queue,
                             on_up=functools.partial(self.hub.request_snapshots,
                                                     f"relay link to hub {hub_id} up"))
            self.links[hub_id] = link
            log.info("route share relay: found hub %s (%s at %s); linking", hub_id,
                     rec.replica_id, rec.address)
            link.start()
