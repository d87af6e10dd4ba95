"""Registry link, mirror mode: follow ``Registry.WatchPlacement`` into a local index mirror.

The mirror (:class:`~router_service.index_mirror.IndexMirror`) answers lookups in-process (no
registry round trip per request). A (re)connect builds a fresh mirror from the registry's
snapshot and swaps it in at SNAPSHOT_END, so routing keeps using the old one meanwhile. When
the link is down the mirror ages; past ``max_staleness_s`` it is no longer trusted and
:meth:`lookup` raises Unavailable (the router degrades to least_loaded on the last known
nodes). Staleness is exported as a metric.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from kvroute.aio import cancel_and_wait
from kvroute.errors import Unavailable
from kvroute.grpcutil import message_size_options, open_channel
from kvroute.index import OFFLOADED
from kvroute.settings import TLSSettings
from kvroute.targets import TargetRing
from kvroute.v1 import registry_pb2, registry_pb2_grpc
from router_service.index_mirror import IndexMirror
from router_service.placement import DepartureHook, NodeState, Placement
from router_service.retry import LinkLog, LinkNeverUp, reconnect_options, reconnect_retrying

log = logging.getLogger(__name__)
HOLD_EMPTY_S = 5.0
"""How long a reconnect's snapshot may wait while it lacks nodes (or their blocks) that the
previous mirror had (see :meth:`MirrorSource._hold_regression`)."""


class MirrorSource:
    """A local mirror of the placement index that follows the registry."""

    mode = "mirror"
    local = True

    def __init__(self, target: str, tls: TLSSettings | None = None, *,
                 retry_max_s: float = 2.0, max_staleness_s: float = 5.0,
                 on_event_lag: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ring = TargetRing(target)
        self._tls = tls
        self._retry_max_s = retry_max_s
        self._max_staleness_s = max_staleness_s
        self._on_event_lag = on_event_lag
        self._clock = clock
        self._index = IndexMirror()
        self._departed: DepartureHook = self._index.departed
        self._connected = False
        self._held: IndexMirror | None = None
        """A complete snapshot not swapped in yet (see :meth:`_hold_regression`)."""
        self._held_until = 0.0
        self._awaited: set[str] = set()
        """Nodes the held snapshot still lacks, or lists without the blocks they had."""
        self._down_since = clock()
        self._task: asyncio.Task[None] | None = None
        self.events_applied = 0
        self.reconnects = 0
        self._link_log = LinkLog(target, "placement watch (mirror mode)")

    async def start(self) -> None:
        """Start following the registry in the background."""
        self._task = asyncio.create_task(self._run(), name="mirror-follow")

    async def stop(self) -> None:
        """Stop following."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    @property
    def connected(self) -> bool:
        """True while the watch stream is up and the mirror is complete."""
        return self._connected

    def staleness_s(self) -> float:
        """0 while following; otherwise seconds since the link went down."""
        return 0.0 if self._connected else self._clock() - self._down_since

    def usable(self) -> bool:
        """True when the mirror may be routed on (complete and not older than the bound)."""
        self._release_hold()
        return self._index.complete and self.staleness_s() <= self._max_staleness_s

    def registry_block_size(self) -> int:
        """Block size from the registry's events (0 = unknown)."""
        return self._index.block_size

    @property
    def mirror(self) -> IndexMirror:
        """The current mirror of the registry's index (read-only use)."""
        return self._index

    async def lookup(self, block_hashes: Sequence[int], model: str) -> Placement:
        """Longest prefix per node from the mirror; Unavailable once it is too stale."""
        return self.lookup_local(block_hashes, model)

    def lookup_local(self, block_hashes: Sequence[int], model: str) -> Placement:
        """:meth:`lookup`, synchronously (the mirror is in memory)."""
        self._check_usable()
        pairs, offloaded = self._index.lookup_tiers(block_hashes, model)
        return Placement(pairs, self._index.block_size, offloaded)

    def _check_usable(self) -> None:
        if not self.usable():
            why = ("no snapshot received yet" if not self._index.complete
                   else f"registry link down for {self.staleness_s():.1f} s "
                        f"(> {self._max_staleness_s:g} s)")
            raise Unavailable(f"placement mirror unusable: {why}")

    def members(self, model: str) -> list[NodeState]:
        """Nodes of ``model`` in the mirror (for candidate narrowing; do not modify)."""
        return self._index.members(model)

    def matches_local(self, block_hashes: Sequence[int], model: str) -> dict[str, int]:
        """Only the nodes holding a prefix (cost grows with the match); Unavailable when the
        mirror is too stale, as :meth:`lookup_local`."""
        self._check_usable()
        return self._index.matches(block_hashes, model)

    def offloaded_local(self, block_hashes: Sequence[int], model: str) -> dict[str, int]:
        """Node id -> offloaded blocks continuing its device prefix (only nodes with some)."""
        return self._index.offloaded_matches(block_hashes, model)

    def node(self, node_id: str) -> NodeState | None:
        """A node's state by id."""
        return self._index.nodes.get(node_id)

    def last_known(self) -> list[NodeState]:
        """Nodes of the current mirror (last known when the link is down)."""
        self._release_hold()
        return list(self._index.nodes.values())

    def nodes_known(self) -> int:
        """Nodes in the current mirror."""
        return len(self._index.nodes)

    def on_departure(self, hook: DepartureHook) -> None:
        """Call ``hook(node_id)`` for each node that leaves: a NODE_REMOVED event, or a node
        missing from a reconnect's fresh snapshot."""
        self._departed = self._index.departed = hook

    def _swap(self, fresh: IndexMirror) -> None:
        """Route on ``fresh`` from now; nodes the old mirror had and it lacks have left."""
        old, self._index = self._index, fresh
        fresh.departed = self._departed
        for node_id in old.nodes.keys() - fresh.nodes.keys():
            self._departed(node_id)

    # -- background -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                async for attempt in reconnect_retrying(self._retry_max_s):
                    with attempt:
                        await self._follow_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in event handling must not stop the follower
                log.exception("placement mirror follower failed; reconnecting")
                await asyncio.sleep(self._retry_max_s)

    def _hold_regression(self, fresh: IndexMirror) -> bool:
        """True while a reconnect's complete snapshot lacks a node the current mirror has, or
        lists it without the blocks it had. A registry that restarted after the leases
        expired (an outage longer than the TTL) knows no node until the agents re-register,
        one at a time over about a second, and each re-registered node has no blocks until
        its Resync moments later. Swapping in such a snapshot would fail every request (no
        node yet) or route prefixes away from the nodes that hold them (a node not listed
        yet, or listed without its blocks) and the router's recent-route belief then keeps
        them there. The previous mirror keeps routing until every node it had is listed with
        blocks again, or ``HOLD_EMPTY_S`` passed (then the nodes still missing really left or
        really lost their cache)."""
        if fresh is self._index or not self._index.nodes:
            return False
        old = self._index  # not updated while a snapshot is held
        if self._held is not fresh:
            self._awaited = set(old.nodes)
        self._awaited = {n for n in self._awaited if n not in fresh.nodes
                         or (_holds_blocks(old, n) and not _holds_blocks(fresh, n))}
        if not self._awaited:
            return False
        return self._held is not fresh or self._clock() < self._held_until

    def _release_hold(self) -> None:
        """Swap in a held snapshot once its time is up (also without new events)."""
        if self._held is not None and self._clock() >= self._held_until:
            self._swap(self._held)
            self._held = None
            self._connected = True
            log.warning("registry still lacks %d node(s) (or their blocks) of the previous "
                        "mirror after %g s: routing on what it lists (%s)", len(self._awaited),
                        HOLD_EMPTY_S, ", ".join(sorted(self._awaited)[:5]))

    def _mark_down(self) -> None:
        if self._connected:
            self._connected = False
            self._down_since = self._clock()
            log.warning("registry watch lost; mirror ages from now (bound %.1f s)",
                        self._max_staleness_s)

    async def _follow_once(self) -> None:
        """One watch: snapshot, then live changes. Returns if it was ever up (resets back-off).

        With several registry addresses, a watch that fails or ends moves to the next one;
        the current mirror keeps serving lookups meanwhile (within the staleness bound).
        """
        target = self._ring.current
        channel = open_channel(
            target, self._tls,
            [*message_size_options(64 << 20), *reconnect_options(self._retry_max_s)])
        was_up = False
        try:
            stub = registry_pb2_grpc.RegistryStub(channel)
            call = stub.WatchPlacement(registry_pb2.WatchPlacementRequest())
            fresh = IndexMirror()
            lag_cb = self._on_event_lag
            async for ev in call:
                if not was_up:
                    fresh.apply(ev)
                    if fresh.complete and self._hold_regression(fresh):
                        if self._held is not fresh:
                            self._held, self._held_until = fresh, self._clock() + HOLD_EMPTY_S
                            log.warning("registry %s lacks %d of the %d nodes of the previous "
                                        "mirror, or their blocks (restarted after the leases "
                                        "expired? agents re-register and resync within about "
                                        "a second): routing on the previous mirror for up to "
                                        "%g s", target, len(self._awaited),
                                        len(self._index.nodes), HOLD_EMPTY_S)
                    elif fresh.complete:
                        self._held = None
                        self._swap(fresh)
                        was_up = True
                        self._connected = True
                        self.reconnects += 1
                        self._link_log.up()
                        log.info("placement mirror in sync with %s: %d nodes, block size %d",
                                 target, len(fresh.nodes), fresh.block_size)
                else:
                    self._index.apply(ev)
                self.events_applied += 1
                if lag_cb is not None and ev.sent_unix_ms:
                    lag_cb(max(0.0, time.time() - ev.sent_unix_ms / 1000.0))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            nxt = self._ring.advance()
            if was_up:
                log.warning("registry watch on %s ended: %s%s", target, _short(exc),
                            f"; trying {nxt}" if nxt != target else "")
                return
            self._link_log.failed(exc)
            raise
        finally:
            self._held = None  # a held snapshot of an ended watch is never swapped in
            self._mark_down()
            await channel.close(None)
        if not was_up:
            exc2 = LinkNeverUp("watch ended before its snapshot completed")
            self._link_log.failed(exc2)
            raise exc2


def _holds_blocks(mirror: IndexMirror, node_id: str) -> bool:
    return bool(mirror.blocks_of(node_id) or mirror.blocks_of(node_id, OFFLOADED))


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        return f"{type(exc).__name__}: {details()}"
    return repr(exc)
