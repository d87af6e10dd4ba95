"""A rogue registry client against real etcd, registry and router processes (bounded: ~40 s).

Runs ``kvroute bench flood`` (bench/flood_bench.py) with short windows: one heartbeat of 1 M
hashes for a 1,000-block node is refused with RESOURCE_EXHAUSTED naming the node, the limit
and the count; the rogue's node has 0 blocks indexed after a flood of such heartbeats; the
registry's and both routers' RSS stay within a few MB; and Route p99 (replica and stream
router modes) under the flood shows no starvation: within 3x of its steady value (the higher p99 of
the windows just before and after it, as the benchmark reads it) or within 30 ms of it. The 2x
figure is a speed goal: the benchmark holds it, not this test.
"""

from __future__ import annotations

import pytest

from bench.flood_bench import FloodConfig, run_flood_bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(240)
def test_rogue_flood_is_refused_and_bounded() -> None:
    out = run_flood_bench(FloodConfig(duration_s=3.0, rate_per_s=150.0), log=print)
    v = out["verdict"]
    one = out["one_heartbeat"]
    assert v["heartbeat_refused"], one
    assert "rogue" in one["details"] and "1000000" in one["details"], one
    assert "capacity_blocks 1000" in one["details"], one
    assert v["index_unchanged"], out["rogue_blocks_indexed"]
    # refused heartbeats never refresh the lease: the rogue node expires (NOT_FOUND after)
    assert set(out["rogue"]["codes"]) <= {"RESOURCE_EXHAUSTED", "NOT_FOUND"}, out["rogue"]
    assert v["rss_within_slack"], (out["rss_mb_before"], out["rss_mb_after"])
    # The latency bar itself (flood p99 within 2x of steady) is a benchmark figure
    # (`kvroute bench flood`, README "Security"): 450 samples of a 1-2 ms p99 in a 3 s window
    # move by 2x with the machine's other load. What the test holds is the failure the issue
    # measured — a starved registry (p99 8 -> 68 ms, UNAVAILABLE): the flood adds at most a
    # few milliseconds to any router's p99.
    # The reference is the bench's own (flood_bench's verdict): the higher p99 of the windows
    # just before and just after the flood, since other load on a shared machine moves p99
    # between windows. (A failed Route call fails the measurement itself.)
    # The guard sits between the failure and the noise: starvation measured p99 68 ms over a
    # steady 8 ms (+60 ms, 8x); CPU contention on a shared 2-core machine, with the registry
    # refusing as it should, measured +12.4 ms (mirror mode, whose Routes never reach the
    # registry: the flood's own CPU use) and +13.5 ms (stream mode) in two CI runs that failed
    # the earlier +10 ms guard. Speed goals are the benchmark's (house rule 3).
    for mode, flood in out["flood"].items():
        steady_p99 = max(out["steady"][mode]["p99_ms"], out["steady_after"][mode]["p99_ms"])
        assert flood["p99_ms"] <= max(3.0 * steady_p99, steady_p99 + 30.0), \
            (mode, out["steady"], out["flood"], out["steady_after"])
