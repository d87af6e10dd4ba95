"""bench.replica_view: the replicas' view staleness from their metrics page and the spacing of
their decisions in a workload's bursts (issue 19)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bench.replica_view import (
    STALENESS_METRIC,
    burst_spacing,
    histogram,
    histogram_summary,
    spacing_note,
)
from router_service.metrics import RouterMetrics


def _page(observations: list[float]) -> str:
    """A router's real /metrics page after these staleness observations."""
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    for v in observations:
        metrics.shared_view_staleness.observe(v)
    return generate_latest(registry).decode()


def test_staleness_quantiles_come_from_the_routers_histogram() -> None:
    # 98 observations in (0.5, 1] ms, one in (2, 3] ms, one in (15, 20] ms
    page = _page([0.0008] * 98 + [0.003, 0.02])
    s = histogram_summary(page)
    assert s["count"] == 100
    assert s["mean_ms"] == pytest.approx((98 * 0.8 + 3 + 20) / 100, abs=1e-3)
    # p50: rank 50 of 98 in the (0.5, 1] bucket, interpolated as PromQL does
    assert s["p50_ms"] == pytest.approx(0.5 + 0.5 * 50 / 98, abs=1e-3)
    assert s["p50_bucket_ms"] == [0.5, 1.0]
    # p99: rank 99 is the bucket (2, 3] ms holding only the 3-ms observation
    assert s["p99_ms"] == pytest.approx(3.0, abs=1e-3)
    assert s["p99_bucket_ms"] == [2.0, 3.0]
    assert s["max_le_ms"] == 20.0 and s["max_above_ms"] is None
    assert "p50 0.755 (in (0.5, 1]) / p99 3 (in (2, 3])" in spacing_note(
        burst_spacing([0.0, 0.0], [0, 0], [0.0, 0.0], [0.001, 0.002], 1, 2.0, [s]))


def test_staleness_buckets_are_fine_where_the_staleness_lies() -> None:
    # 4.5 ms and 35 ms are no longer interpolated across (2, 5] and (25, 50] ms
    s = histogram_summary(_page([0.0045] * 99 + [0.035]))
    assert s["p50_bucket_ms"] == [4.0, 5.0] and s["max_le_ms"] == 40.0


def test_le_is_read_from_its_own_label_whatever_the_other_labels_say() -> None:
    page = "\n".join([
        f'{STALENESS_METRIC}_bucket{{peer="a",note="le=\\"9\\"",le="0.001"}} 2',
        f'{STALENESS_METRIC}_bucket{{peer="a",note="x",le="+Inf"}} 3',
        f'{STALENESS_METRIC}_bucket{{le="0.001",peer="b"}} 1',
        f'{STALENESS_METRIC}_bucket{{le="+Inf",peer="b"}} 1',
        f'{STALENESS_METRIC}_sum{{peer="a"}} 0.5',
        f'{STALENESS_METRIC}_count{{peer="a"}} 3',
        f'{STALENESS_METRIC}_count{{peer="b"}} 1',
    ])
    buckets, total, count = histogram(page, STALENESS_METRIC)
    assert buckets == [(0.001, 3.0), (math.inf, 4.0)]
    assert total == 0.5 and count == 4.0


def test_staleness_past_the_last_bucket_and_a_page_without_it() -> None:
    s = histogram_summary(_page([0.0001, 3.0]))
    assert s["max_le_ms"] is None and s["max_above_ms"] == 1000.0
    assert histogram_summary("# nothing here\n")["count"] == 0
    assert histogram_summary(_page([]))["p50_ms"] is None
    assert STALENESS_METRIC in _page([])


def test_burst_spacing_tells_unseen_peer_decisions_from_seen_ones() -> None:
    # tick 0.0: replica 0 at 10 ms, replica 1 at 10.5 ms, replica 0 again at 20 ms;
    # tick 3.0: replica 1 alone (no burst); one failed request (NaN answer) in tick 0.0
    ticks = [0.0, 0.0, 0.0, 3.0, 0.0]
    fronts = [0, 1, 0, 1, 1]
    sent = [0.009, 0.009, 0.009, 0.6, 0.009]
    answered = [0.010, 0.0105, 0.020, 0.601, math.nan]
    staleness = [{"p50_ms": 0.8, "p99_ms": 2.0}, {"p50_ms": 0.4, "p99_ms": 1.0}]
    v = burst_spacing(ticks, fronts, sent, answered, 2, 2.0, staleness)
    assert v["burst_ticks"] == 1
    assert v["tick_answer_spread_ms"]["p50"] == pytest.approx(10.0)
    r0, r1 = v["per_replica"]
    assert r0["decisions_in_ticks"] == 2 and r0["own_gap_ms"]["p50"] == pytest.approx(10.0)
    assert r0["own_gaps_within_window"] == 0.0
    # replica 0's second decision came 9.5 ms after replica 1's: seen at either staleness
    assert r0["earlier_peer_decisions"] == 1 and r0["peers_unseen_p99"] == 0.0
    assert r0["peer_gap_ms"]["p50"] == pytest.approx(9.5)
    # replica 1 decided 0.5 ms after replica 0: beyond its p50 staleness (0.4), within p99 (1)
    assert r1["earlier_peer_decisions"] == 1
    assert r1["peers_unseen_p50"] == 0.0 and r1["peers_unseen_p99"] == 1.0
    assert r1["route_rtt_ms"]["p50"] == pytest.approx(1.25, abs=0.01)  # 1.5 and 1 ms
    # ...but the decisions lie somewhere in [send, answer]: replica 1 sent at 9 ms, before
    # replica 0's answer (10 ms), so it may have decided first (narrowest gap -1 ms) and the
    # widest gap (10.5 - 9 = 1.5 ms) exceeds both stalenesses: anything from 0 to 1
    assert r1["peers_unseen_p50_bounds"] == [0.0, 1.0]
    assert r1["peers_unseen_p99_bounds"] == [0.0, 1.0]
    # replica 0's second decision: widest gap 20 - 9 = 11 ms, narrowest 9 - 10.5 < 0
    assert r0["peers_unseen_p99_bounds"] == [0.0, 1.0]
    note = spacing_note(v)
    assert note.startswith("burst spacing") and "#1: staleness p50 0.4 (-) / p99 1 (-)" in note
    assert "bounds from send / answer times [0, 1] / [0, 1]" in note
    assert "Route RTT (the timing's error) p50 1.25 / p90" in note


def test_unseen_bounds_agree_when_round_trips_are_short() -> None:
    # replica 1 sends at 10.1 ms, after replica 0's answer (10.0): gaps between 0.1 and 0.3 ms
    v = burst_spacing([0.0, 0.0], [0, 1], [0.0099, 0.0101], [0.0100, 0.0102], 2, 2.0,
                      [{"p50_ms": 1.0, "p99_ms": 2.0}, {"p50_ms": 1.0, "p99_ms": 2.0}])
    r1 = v["per_replica"][1]
    assert r1["peers_unseen_p50"] == 1.0 and r1["peers_unseen_p50_bounds"] == [1.0, 1.0]


def test_spread_arrivals_have_no_burst_to_describe() -> None:
    v = burst_spacing([0.0, 0.1], [0, 1], [0.0, 0.02], [0.001, 0.021], 2, 2.0, [{}, {}])
    assert v["burst_ticks"] == 0 and v["per_replica"][0]["own_gap_ms"] is None
    assert "nothing to describe" in spacing_note(v)
