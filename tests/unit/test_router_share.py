"""Router replicas sharing their view of load (issue 19): remote in-flight, queued prefill,
recent routes, completes through any replica, and the fall back to own counts."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from kvroute.blocks import hash_blocks
from router_service.core import RouterCore
from router_service.domain import RouteRequest
from router_service.load import LoadTracker
from router_service.policies.factory import PolicySet
from router_service.route_share import RemoteLoad, RouteDelta, SharedView
from router_service.settings import RouterSettings
from router_service.tokenizer import load_tokenizer
from tests.unit.test_router_core import Clock
from tests.unit.test_router_servicer import BS, MemorySource

PROMPT = list(range(900, 900 + 8 * BS))
HASHES = hash_blocks(PROMPT, BS)


class Bus:
    """Delivers every published delta to every core at once (zero staleness)."""

    def __init__(self) -> None:
        self.cores: list[RouterCore] = []
        self.sent: list[RouteDelta] = []
        self.paused = False

    def publish(self, d: RouteDelta) -> None:
        self.sent.append(d)
        if not self.paused:
            for c in self.cores:
                c.apply_remote(d)


def _replicas(n: int, clock: Clock, **view_kw: float,
              ) -> tuple[list[RouterCore], Bus, MemorySource]:
    src = MemorySource()
    for nid in ("a", "b", "c"):
        src.add(nid)
    bus = Bus()
    cores = []
    for k in range(n):
        view = SharedView(f"r{k}", bus.publish, clock, timeout_s=5.0, **view_kw)
        view.set_connected(True)
        cores.append(RouterCore(RouterSettings(registry="127.0.0.1:1"), PolicySet(), src,
                                LoadTracker(clock), load_tokenizer("simple"), clock=clock,
                                share=view))
    bus.cores = cores
    return cores, bus, src


def test_a_replica_counts_the_others_inflight_and_queued_prefill() -> None:
    clk = Clock()
    (a, b), _, _ = _replicas(2, clk)
    d = a.decide_local(RouteRequest("q1", token_ids=PROMPT))
    assert b.share is not None and b.share.remote.inflight(d.node_id) == 1
    assert b.tracker.pending_prefill(d.node_id) == pytest.approx(len(PROMPT))
    assert b.tracker.inflight(d.node_id) == 0  # own counts untouched
    # b's next request with another prompt avoids the node a just loaded
    d2 = b.decide_local(RouteRequest("q2", token_ids=list(range(5000, 5000 + 8 * BS))))
    assert d2.node_id != d.node_id


def test_a_follow_up_on_another_replica_finds_the_recently_routed_node() -> None:
    clk = Clock()
    (a, b), _, _ = _replicas(2, clk)
    long = list(range(900, 900 + 64 * BS))
    d = a.decide_local(RouteRequest("q1", token_ids=long))
    follow = long + list(range(7000, 7000 + 2 * BS))
    d2 = b.decide_local(RouteRequest("q2", token_ids=follow))
    assert d2.node_id == d.node_id
    assert "routed there, not yet reported" in d2.reason


def test_complete_through_any_replica_releases_everywhere() -> None:
    clk = Clock()
    (a, b, c), _, _ = _replicas(3, clk)
    d = a.decide_local(RouteRequest("q1", token_ids=PROMPT))
    assert b.complete("q1")  # a Service sent the Complete to another replica
    assert a.tracker.inflight(d.node_id) == 0
    assert c.share is not None and c.share.remote.inflight(d.node_id) == 0
    assert not b.complete("q1")


def test_a_replica_that_loses_the_shared_view_uses_its_own_counts_and_says_so() -> None:
    clk = Clock()
    (a, b), bus, _ = _replicas(2, clk)
    a.decide_local(RouteRequest("q1", token_ids=PROMPT))
    assert b.share is not None and b.share.remote.total == 1
    bus.paused = True
    clk.t += 6.0  # nothing heard for longer than timeout_s
    d = b.decide_local(RouteRequest("q2", token_ids=PROMPT))
    assert d.reason.startswith("OWN COUNTS ONLY (shared view lost: nothing heard")
    assert b.share.remote.total == 0 and b.own_view_decisions == 1
    bus.paused = False
    b.share.set_connected(True)
    d = b.decide_local(RouteRequest("q3", token_ids=PROMPT))
    assert not d.reason.startswith("OWN COUNTS ONLY")


def test_traffic_that_reaches_every_replica_at_once_makes_every_decision_a_burst() -> None:
    clk = Clock()
    cores, _bus, _src = _replicas(3, clk)
    views = [c.share for c in cores]
    v0 = views[0]
    assert v0 is not None and v0.burst_coincidence == 0.5
    for tick in range(12):  # every 3 s all three replicas decide at the same instant
        clk.t = 3.0 * tick
        for k, c in enumerate(cores):
            c.decide_local(RouteRequest(request_id=f"t{tick}-{k}",
                                        token_ids=list(range(100 * tick + k, 100 * tick + k
                                                             + 4 * BS))))
    assert v0.coincidence > 0.5
    clk.t += 3.0  # the next tick's first request: nothing routed for 3 s, yet a burst
    assert v0.in_burst()
    d = cores[0].decide_local(RouteRequest(request_id="first", token_ids=PROMPT))
    assert "of 3 replicas" in d.reason
    for k in range(40):  # then the replicas take turns, 0.5 s apart: never side by side
        clk.t += 0.5
        cores[1 + k % 2].decide_local(RouteRequest(request_id=f"s{k}", token_ids=PROMPT))
    assert v0.coincidence < 0.5
    clk.t += 1.0
    assert not v0.in_burst()
    off = SharedView("x", lambda d: None, clk, burst_coincidence=2.0)
    assert off.burst_coincidence == 2.0
    with pytest.raises(ValueError):
        SharedView("x", lambda d: None, clk, burst_coincidence=-1.0)


def test_staggered_replicas_take_turns_in_a_burst_instead_of_slots() -> None:
    clk = Clock()
    cores, _bus, _src = _replicas(3, clk, burst_stagger_s=0.005)
    for c in cores:  # every replica routes once: each learns the other two, all in a burst
        c.decide_local(RouteRequest(request_id=f"w-{id(c)}", token_ids=PROMPT))
    views = [c.share for c in cores]
    waits = sorted(v.stagger_wait() for v in views if v is not None)
    assert waits == [0.0, 0.005, 0.010]  # rank x the stagger: rank 0 decides at once
    last = max(cores, key=lambda c: c.share.rank() if c.share is not None else 0)
    assert last.share is not None and last.share.staggered_total == 1
    t0 = time.monotonic()
    d = asyncio.run(last.decide(RouteRequest(request_id="burst", token_ids=PROMPT)))
    assert time.monotonic() - t0 >= 0.009  # waited its turn
    assert "replicas" not in d.reason  # taking turns replaces the slots of one plan
    clk.t += 1.0  # no burst: nobody waits
    assert all(v is not None and v.stagger_wait() == 0.0 for v in views)
    with pytest.raises(ValueError):
        SharedView("x", lambda d: None, clk, burst_stagger_s=-0.1)


def test_own_deltas_are_ignored_and_block_prefix_is_bounded() -> None:
    clk = Clock()
    sent: list[RouteDelta] = []
    view = SharedView("r0", sent.append, clk, max_blocks=3)
    view.set_connected(True)
    view.routed("x", "a", 10, 5, list(range(10)))
    assert sent[0].block_hashes == (0, 1, 2) and sent[0].sent_at == 0.0
    with pytest.raises(ValueError):
        SharedView("", sent.append, clk)


def test_remote_load_expires_lost_completions() -> None:
    clk = Clock()
    r = RemoteLoad(clk, inflight_timeout_s=10.0)
    r.start("r1", "q1", "a")
    r.start("r1", "q1", "a")  # a repeat is counted once
    assert r.inflight("a") == 1
    clk.t = 11.0
    assert r.expire() == 1 and r.inflight("a") == 0 and r.expired_total == 1
    assert r.complete(None, "q1") is None


def test_remote_load_per_replica_index_matches_a_reference_model() -> None:
    """Random starts, completions (by replica or by id only), forgets, snapshot replaces,
    expiries and evictions (max_tracked): per replica, per node and in total the counts match
    a plain model, and a forget or replace drops exactly that replica's requests."""
    rng = random.Random(7)
    clk = Clock()
    r = RemoteLoad(clk, inflight_timeout_s=50.0, max_tracked=60)
    model: dict[tuple[str, str], tuple[str, float]] = {}  # key -> node, started (in order)
    by_id: dict[str, tuple[str, str]] = {}  # request id -> the key of its newest start

    def remove(key: tuple[str, str]) -> None:
        del model[key]
        if by_id.get(key[1]) == key:
            del by_id[key[1]]

    def expire() -> None:
        for key in [k for k, (_, t) in model.items() if t <= clk.t - 50.0]:
            remove(key)

    replicas, nodes = ["r1", "r2", "r3"], ["a", "b"]
    for step in range(3000):
        clk.t += rng.random()
        op = rng.random()
        rep, rid = rng.choice(replicas), f"q{rng.randrange(80)}"
        if op < 0.6:
            node = rng.choice(nodes)
            r.start(rep, rid, node)
            expire()
            if (rep, rid) in model:
                remove((rep, rid))
            while len(model) >= 60:
                remove(next(iter(model)))
            model[(rep, rid)] = (node, clk.t)
            by_id[rid] = (rep, rid)
        elif op < 0.8:
            if rng.random() < 0.5:
                key = by_id.get(rid)
                got = r.complete(None, rid)
            else:
                key = (rep, rid)
                got = r.complete(rep, rid)
            assert got == (model[key][0] if key in model else None), step
            if key in model:
                remove(key)
        elif op < 0.9:
            n = r.forget(rep) if op < 0.85 else r.replace(rep, 0)
            held = [k for k in model if k[0] == rep]
            assert n == len(held), step
            for k in held:
                remove(k)
        else:
            r.expire()
            expire()
        assert r.total == len(model), step
        for rp in replicas:
            assert r.of(rp) == sum(1 for k in model if k[0] == rp), (step, rp)
            for node in nodes:
                assert r.of(rp, node) == sum(
                    1 for k, (nd, _) in model.items() if k[0] == rp and nd == node), step
        for node in nodes:
            assert r.inflight(node) == sum(1 for nd, _ in model.values() if nd == node), step
    r.clear()
    assert r.total == 0 and all(r.of(rp) == 0 for rp in replicas)


def test_tracker_drains_at_a_node_s_calibrated_rate() -> None:
    clk = Clock()
    t = LoadTracker(clk, prefill_tokens_per_s=1000.0)
    t.start("q1", "a", 4000)
    t.add_prefill("b", 4000)
    t.set_rate("b", 4000.0)
    clk.t = 1.0
    assert t.pending_prefill("a") == pytest.approx(3000.0)
    assert t.pending_prefill("b") == pytest.approx(0.0)
    assert t.rate("b") == 4000.0 and t.rate("a") == 1000.0
    t.set_rate("b", 0.0)
    assert t.rate("b") == 1000.0


def test_peers_rank_and_bursts_tell_kv_aware_when_replicas_decide_side_by_side() -> None:
    clk = Clock()
    cores, _bus, _src = _replicas(3, clk)
    views = [c.share for c in cores]
    assert all(v is not None for v in views)
    for c in cores:  # every replica routes once: each learns the other two
        c.decide_local(RouteRequest(request_id=f"w-{id(c)}", token_ids=PROMPT))
    assert [v.peers() for v in views if v is not None] == [2, 2, 2]
    assert sorted(v.rank() for v in views if v is not None) == [0, 1, 2]
    v0 = views[0]
    assert v0 is not None and v0.in_burst()  # routed just now
    d = cores[0].decide_local(RouteRequest(request_id="burst", token_ids=PROMPT))
    assert "of 3 replicas" in d.reason
    clk.t += 1.0  # a second later: no burst, the plain best node
    d = cores[0].decide_local(RouteRequest(request_id="calm", token_ids=PROMPT))
    assert "replicas" not in d.reason
    clk.t += 60.0  # peers that have not routed for the peer window no longer count
    assert v0.peers() == 0
    v0.set_connected(False, "test")
    assert v0.peers() == 0


def test_each_replica_counts_the_deltas_it_published_apart_from_those_it_applied() -> None:
    """``deltas_published_total`` is the sender's own count: the receiver's staleness count
    (deltas applied) can be held against it."""
    from prometheus_client import CollectorRegistry

    from router_service.metrics import RouterMetrics

    clk = Clock()
    src = MemorySource()
    src.add("a")
    bus = Bus()
    metrics = [RouterMetrics(CollectorRegistry()) for _ in range(2)]
    for k in range(2):
        view = SharedView(f"r{k}", bus.publish, clk, timeout_s=5.0)
        view.set_connected(True)
        bus.cores.append(RouterCore(RouterSettings(registry="127.0.0.1:1"), PolicySet(), src,
                                    LoadTracker(clk), load_tokenizer("simple"),
                                    metrics=metrics[k], clock=clk, share=view))
    a, b = bus.cores
    a.decide_local(RouteRequest("q1", token_ids=PROMPT))
    a.decide_local(RouteRequest("q2", token_ids=PROMPT))
    assert b.complete("q1")  # completed through b: b publishes the completion
    assert not b.complete("nobody")  # nothing released: nothing published

    def value(k: int, name: str) -> float:
        got = metrics[k].registry.get_sample_value(name)
        return 0.0 if got is None else got

    published = "kvroute_router_shared_view_deltas_published_total"
    applied = "kvroute_router_shared_view_staleness_seconds_count"
    assert (value(0, published), value(1, published)) == (2.0, 1.0)
    assert (value(1, applied), value(0, applied)) == (2.0, 1.0)
