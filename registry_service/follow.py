"""Following the placement store: list it, then watch from the listed revision; list again when
the watch is compacted away or fails. And the health sweep that tells watchers when a node's
heartbeats turn late (or on time again). Time the registry itself did not run (its event loop
stalled: a long GC pause, a frozen process, a starved machine) does not make a node late: the
heartbeats of that time are still queued, unread (see :meth:`ReplicaView.note_running`).

Every change, whether this replica wrote it or another did, reaches the view through here or
through the core's write path, and :meth:`ReplicaView.apply` is idempotent, so the two may
overlap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from kvroute.aio import cancel_and_wait
from kvroute.errors import KvrouteError
from registry_service.metrics import RegistryMetrics
from registry_service.nodes import Change, Fanout, now_ms
from registry_service.store.base import LoadResult, PlacementStore, StoreUnavailable, WatchRestart
from registry_service.view import ReplicaView

log = logging.getLogger(__name__)
SWEEP_S = 0.5
"""Seconds between two health sweeps (well inside the view's ``STALL_AFTER_S``)."""


class StoreFollower:
    """Keeps a :class:`ReplicaView` equal to the store (module docstring)."""

    def __init__(self, store: PlacementStore, load: Callable[[], Awaitable[LoadResult]],
                 view: ReplicaView, fanout: Fanout, metrics: RegistryMetrics) -> None:
        self._store = store
        self._load = load
        """The store's full listing (through the core's metrics and error mapping)."""
        self._view = view
        self._fanout = fanout
        self._metrics = metrics
        self._follower: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._was_healthy: dict[str, bool] = {}
        self.synced = asyncio.Event()
        """Set once the first listing is applied."""

    async def start(self) -> None:
        """List the store once (raises when it cannot), then follow it in the background."""
        revision = await self._relist()
        self._follower = asyncio.create_task(self._follow(revision), name="registry-follower")
        self._view.watch_stalls(True)
        self._sweeper = asyncio.create_task(self._sweep_health(), name="registry-health")

    async def freeze_health(self) -> None:
        """Stop re-evaluating health (a draining replica stops hearing heartbeats)."""
        sweeper, self._sweeper = self._sweeper, None
        self._view.watch_stalls(False)
        await cancel_and_wait(sweeper)

    async def stop(self) -> None:
        """Stop following and sweeping."""
        tasks = (self._follower, self._sweeper)
        self._follower = self._sweeper = None
        self._view.watch_stalls(False)
        await cancel_and_wait(*tasks)

    async def _relist(self) -> int:
        loaded = await self._load()
        self._view.reconcile(loaded)
        self._metrics.store_relists.inc()
        self.synced.set()
        return loaded.revision

    async def _follow(self, listed: int) -> None:
        """Watch from the first listing's revision (not a second listing: what happened since
        comes as events); list again whenever the watch fails or must restart."""
        revision: int | None = listed
        failures = 0
        while True:
            try:
                if revision is None:
                    revision = await self._relist()
                async for batch in self._store.watch(revision):
                    failures = 0
                    for ev in batch:
                        self._view.apply(ev)
                revision = None  # the watch ended (store closing): list again shortly
                await asyncio.sleep(0.5)
            except WatchRestart as exc:
                log.warning("store watch must restart (%s): listing again", exc)
                revision = None
            except Exception as exc:  # never stop following: list again after a pause
                failures += 1
                delay = min(5.0, 0.2 * 2 ** min(failures, 5))
                expected = isinstance(exc, (KvrouteError, StoreUnavailable, OSError))
                log.log(logging.WARNING if expected else logging.ERROR,
                        "following the store failed (%r); listing again in %.1fs", exc, delay,
                        exc_info=not expected)
                revision = None
                await asyncio.sleep(delay)

    async def _sweep_health(self) -> None:
        """Tell watchers when a node turns unhealthy (late heartbeats) or healthy again."""
        view = self._view
        while True:
            await asyncio.sleep(SWEEP_S)
            view.note_running()  # forgives a stall, unless a health read came first and did
            now = now_ms()
            seen = self._was_healthy
            for node_id, state in view.nodes.items():
                healthy = state.healthy(view.late_after_s, now)
                if seen.get(node_id, True) != healthy:
                    self._fanout.publish(Change("upsert", node_id))
                seen[node_id] = healthy
            for node_id in [n for n in seen if n not in view.nodes]:
                del seen[node_id]
