"""LoadTracker: in-flight counts, Complete, timeout release, pending prefill drain."""

from __future__ import annotations

from router_service.load import LoadTracker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_inflight_counts_and_complete() -> None:
    lt = LoadTracker(Clock())
    lt.start("r1", "a", 100)
    lt.start("r2", "a", 0)
    lt.start("r3", "b", 0)
    assert lt.inflight_by_node() == {"a": 2, "b": 1}
    assert lt.complete("r1") == "a"
    assert lt.complete("r1") is None
    assert lt.inflight("a") == 1 and lt.total_inflight == 2
    lt.start("r3", "c", 0)  # same id routed again: released from b first
    assert lt.inflight_by_node() == {"a": 1, "c": 1}


def test_lost_complete_is_released_by_the_timeout_and_counted() -> None:
    clock = Clock()
    lt = LoadTracker(clock, inflight_timeout_s=30)
    lt.start("r1", "a", 0)
    clock.t += 20
    lt.start("r2", "a", 0)
    clock.t += 15  # r1 is 35 s old, r2 15 s
    assert lt.inflight_by_node() == {"a": 1}
    assert lt.expired_total == 1
    assert lt.complete("r1") is None and lt.complete("r2") == "a"
    assert lt.expired_total == 1


def test_pending_prefill_drains_at_the_configured_rate() -> None:
    clock = Clock()
    lt = LoadTracker(clock, prefill_tokens_per_s=1000)
    lt.start("r1", "a", 3000)
    assert lt.pending_prefill("a") == 3000
    clock.t += 1
    assert lt.pending_prefill("a") == 2000
    lt.start("r2", "a", 500)
    assert lt.pending_prefill("a") == 2500
    clock.t += 10
    assert lt.pending_prefill("a") == 0 and lt.pending_prefill("zz") == 0


def test_size_bound_releases_oldest() -> None:
    lt = LoadTracker(Clock(), max_tracked=2)
    for i in range(3):
        lt.start(f"r{i}", "a", 0)
    assert lt.total_inflight == 2 and lt.expired_total == 1
    assert lt.complete("r0") is None


def test_caller_deadline_releases_abandoned_requests_early() -> None:
    clock = Clock()
    lt = LoadTracker(clock, inflight_timeout_s=300)
    lt.start("r1", "a", 0, deadline_s=2.0)
    lt.start("r2", "a", 0)  # no deadline: the timeout
    lt.start("r3", "b", 0, deadline_s=5.0)
    lt.start("r4", "b", 0, deadline_s=1.0)
    assert lt.complete("r4") == "b"  # completed before its deadline: not an expiry
    clock.t += 2.5
    assert lt.inflight_by_node() == {"a": 1, "b": 1} and lt.expired_total == 1
    lt.start("r3", "a", 0, deadline_s=10.0)  # routed again: the old deadline no longer applies
    clock.t += 3.0
    assert lt.inflight_by_node() == {"a": 2} and lt.expired_total == 1
    clock.t += 10
    assert lt.inflight_by_node() == {"a": 1} and lt.expired_total == 2
