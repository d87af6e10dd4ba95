"""N router replicas over one simulated fleet (``kvroute bench --mode sim --routers N``).

Each replica is a full :class:`~router_service.core.RouterCore` with its own policy instance
(kv_aware's recent routes, running average, rotating start) and its own
:class:`~router_service.load.LoadTracker`, exactly as N ``kvroute serve router`` pods behind a
Kubernetes Service. Requests are spread over them the way the Service does (``random``: kube-proxy's
iptables mode picks a backend at random per connection, one request per connection here;
``round_robin``: IPVS' default ``rr``). A request's completion goes back to the replica that
routed it (the gateway proxies the response).

With ``--share-routes`` (default on) every replica publishes its routing deltas on a
:class:`ShareBus` that delivers them to every other replica ``--share-delay-s`` later (the
shared view's staleness: the registry hop in production); ``--no-share-routes`` is the
baseline where every replica sees only its own 1/N of the load.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvroute.settings import require, setting
from router_service.core import RouterCore
from router_service.route_share import RouteDelta, SharedView

SPREADS = ("random", "round_robin")


@dataclass(frozen=True)
class ReplicaSettings:
    """The sim's routers: how many replicas, whether they share their view of load, and
    whether they use each engine's measured prefill rate."""

    routers: int = setting(1, "router replicas over the same fleet, each with its own load "
                              "tracker and policy state (a Kubernetes Deployment's pods)")
    spread: str = setting(
        "random", "how requests reach replicas: random (kube-proxy iptables mode, per request) "
                  "or round_robin (IPVS rr)")
    share_routes: bool = setting(
        True, "replicas share routing deltas (in-flight, queued prefill, recent routes); "
              "--no-share-routes: each replica sees only its own requests")
    share_delay_s: float = setting(
        0.005, "staleness of the shared view: a delta reaches the other replicas this many "
               "model seconds after the decision (the registry hop)")
    share_max_blocks: int = setting(
        64, "leading block hashes of each routed request shared for recent-routes overlap")
    share_burst_window_s: float = setting(
        0.01, "a replica that routed another request within this many model seconds is in a "
              "burst and kv_aware takes its own slot of the replicas' plan (the router's "
              "--share-burst-window-s; --mode stack gives the routers, on the wall clock, "
              "this x --time-scale, at least --share-burst-window-min-wall-s)")
    share_burst_window_min_wall_s: float = setting(
        0.01, "--mode stack: the routers' burst window is at least this many wall seconds "
              "whatever --time-scale (the window x --time-scale above can be shorter than the "
              "shared view's real staleness, which the trace's compression does not shrink: "
              "p50 ~6 ms through the stack on 2 cores; the router's own default, 0.01 s, is "
              "what a deployment runs); 0 = the scaled window only")
    share_burst_coincidence: float = setting(
        0.5, "every decision counts as in a burst while at least this share of the other "
             "replicas' recent decisions were made within --share-burst-window-s of one of "
             "this replica's (the router's --share-burst-coincidence; above 1 = off)")
    share_burst_stagger_s: float = setting(
        0.0, "in a burst the replica ranked r decides r x this many model seconds later, with "
             "the lower ranks' decisions in view (the router's --share-burst-stagger-s; the wait "
             "counts in its TTFT); 0 = off. --mode stack gives the routers this x --time-scale "
             "wall seconds (no wall floor, unlike the window): to outlast the stack's real "
             "view staleness (wall time) it must exceed that staleness / --time-scale, and "
             "being below --share-burst-window-s in model seconds, it needs a wider window "
             "than the default, best (--routers - 1) x this (s27: 0.2 with 0.065 = 40 / 13 ms "
             "wall at --time-scale 0.2)")
    calibrate: bool = setting(
        True, "routers use each engine's prefill rate measured from its prefill times (as the "
              "node agent reports it from vLLM's metrics); --kv-prefill-tokens-per-s is then "
              "only the initial value. --no-calibrate: the flag is used throughout")

    def __post_init__(self) -> None:
        require(self.routers >= 1, "routers", "must be >= 1")
        require(self.spread in SPREADS, "spread", f"must be one of {', '.join(SPREADS)}")
        require(self.share_delay_s >= 0, "share_delay_s", "must be >= 0")
        require(self.share_max_blocks >= 0, "share_max_blocks", "must be >= 0")
        require(self.share_burst_window_s >= 0, "share_burst_window_s", "must be >= 0")
        require(self.share_burst_window_min_wall_s >= 0, "share_burst_window_min_wall_s",
                "must be >= 0")
        require(self.share_burst_coincidence >= 0, "share_burst_coincidence", "must be >= 0")
        require(self.share_burst_stagger_s >= 0, "share_burst_stagger_s", "must be >= 0")
        require(self.share_burst_stagger_s < self.share_burst_window_s
                or not self.share_burst_stagger_s, "share_burst_stagger_s",
                "must be below --share-burst-window-s (turns farther apart than the window no "
                "longer look like replicas deciding side by side)")

    def share_flags(self, time_scale: float) -> tuple[str, ...]:
        """The routers' shared-view flags for a stack replay whose engines run ``1 /
        time_scale`` times faster than the wall clock (empty with ``--no-share-routes``).

        The routers measure bursts and wait their turns on the wall clock, while the
        workload's times are compressed by ``time_scale``: so the burst window and the stagger
        (model seconds here, as ``--mode sim`` uses them) go to them x ``time_scale``. Then a
        trace's requests fall in or out of a burst as in the sim, and a turn's wait costs the
        same model time in TTFT. The real view's staleness is not compressed, though (in model
        seconds it is its wall time / ``time_scale``), so the window is at least
        ``share_burst_window_min_wall_s`` wall seconds (see :meth:`wall_burst_window_s`)."""
        if not self.share_routes:
            return ()
        return ("--share-routes", "--share-max-blocks", str(self.share_max_blocks),
                "--share-burst-window-s", str(self.wall_burst_window_s(time_scale)),
                "--share-burst-coincidence", str(self.share_burst_coincidence),
                "--share-burst-stagger-s", str(self.share_burst_stagger_s * time_scale))

    def wall_burst_window_s(self, time_scale: float) -> float:
        """The routers' burst window on the wall clock: the model-second window x
        ``time_scale``, but never below ``share_burst_window_min_wall_s`` — a window shorter
        than the shared view's real staleness cannot tell a burst's replicas apart (s27: 2 ms
        at the default 0.2 took a slot on 8-13 % of raw-tick decisions, the sim on ~99 %)."""
        return max(self.share_burst_window_s * time_scale, self.share_burst_window_min_wall_s)


class ShareBus:
    """Delivers every replica's deltas to every other replica after a fixed delay."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.cores: list[RouterCore] = []
        self._queue: deque[tuple[float, RouteDelta]] = deque()
        self.delivered = 0

    def publish(self, delta: RouteDelta) -> None:
        """Queue a delta (``sent_at`` is the model time it was published)."""
        self._queue.append((delta.sent_at + self.delay_s, delta))

    def deliver(self, now: float) -> None:
        """Apply every delta due by ``now`` on every replica but its sender."""
        q = self._queue
        while q and q[0][0] <= now:
            _, delta = q.popleft()
            for core in self.cores:
                core.apply_remote(delta)
            self.delivered += 1


def make_share(bus: ShareBus, idx: int, clock: Callable[[], float],
               settings: ReplicaSettings) -> SharedView:
    """Replica ``idx``'s end of the shared view on ``bus`` (connected from the start)."""
    view = SharedView(f"router-{idx}", bus.publish, clock, inflight_timeout_s=1e12,
                      max_blocks=settings.share_max_blocks, timeout_s=1e12,
                      burst_window_s=settings.share_burst_window_s,
                      burst_coincidence=settings.share_burst_coincidence,
                      burst_stagger_s=settings.share_burst_stagger_s)
    view.set_connected(True)
    return view


class Spreader:
    """Picks the replica of each request as a Service would."""

    def __init__(self, settings: ReplicaSettings, seed: int) -> None:
        self.n = settings.routers
        self.spread = settings.spread
        self._rng = random.Random(seed)
        self._turn = -1

    def pick(self) -> int:
        """Index of the replica that gets the next request."""
        if self.n == 1:
            return 0
        if self.spread == "random":
            return self._rng.randrange(self.n)
        self._turn = (self._turn + 1) % self.n
        return self._turn
