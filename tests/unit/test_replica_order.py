"""Stack runs with replicas: each replay on a new fleet, runs alternate the order (ABBA), the
replica effect per run and balanced over runs (``bench/replica_order.py``; issue 19)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.cli_stack import stack_policies
from bench.replica_order import format_effect, pairs, replica_effect, run_order, swap_pairs
from bench.stack_backend import split_copy
from kvroute.errors import ConfigError


def test_runs_alternate_the_order_of_each_pair() -> None:
    names = ["kv_aware", "kv_aware@4", "gateway:kv_aware@4", "gateway:kv_aware", "random"]
    swapped = ["kv_aware@4", "kv_aware", "gateway:kv_aware", "gateway:kv_aware@4", "random"]
    assert swap_pairs(names) == swapped
    assert [run_order(names, k, True) for k in range(4)] == [names, swapped, names, swapped]
    assert run_order(names, 1, False) == names
    assert pairs(names) == [("kv_aware", "kv_aware@4"),
                            ("gateway:kv_aware", "gateway:kv_aware@4")]
    assert pairs(["kv_aware", "round_robin"]) == []


def _rep(one: tuple[float, float, float], many: tuple[float, float, float]) -> dict[str, Any]:
    def row(name: str, v: tuple[float, float, float]) -> dict[str, Any]:
        return {"policy": name, "hit_rate_tokens": v[0],
                "ttft_ms": {"p50": 1.0, "p90": v[1], "p99": v[2]}}
    return {"results": [row("kv_aware", one), row("kv_aware@4", many)]}


def test_the_replica_effect_is_given_per_run_and_balanced_over_the_order() -> None:
    """Second replay +0.006 hit on a reused fleet (s26): over an ABBA pair it cancels."""
    reports = [_rep((0.170, 5000, 15000), (0.176, 5100, 15000)),   # replicas second
               _rep((0.176, 5000, 15000), (0.170, 4900, 15300))]   # replicas first
    orders = [["kv_aware", "kv_aware@4"], ["kv_aware@4", "kv_aware"]]
    e = replica_effect(reports, orders)["kv_aware@4"]
    assert e["against"] == "kv_aware" and e["balanced"]
    assert [r["replicas_second"] for r in e["runs"]] == [True, False]
    assert [r["hit"] for r in e["runs"]] == [0.006, -0.006]
    assert e["mean"] == {"hit": 0.0, "p90": 0.0, "p99": 0.01}
    text = format_effect({"kv_aware@4": e})
    assert "hit +0.0060" in text and "replicas first" in text and "order balanced" in text
    one = replica_effect(reports[:1], orders[:1])["kv_aware@4"]
    assert not one["balanced"] and "ONE ORDER ONLY" in format_effect({"kv_aware@4": one})


def test_a_policy_is_replayed_again_under_its_own_label() -> None:
    """``kv_aware,kv_aware#2``: the same policy twice in one run (an A/A check of the harness);
    a name given twice would be replayed once, so it is refused with the way to do it."""
    assert split_copy("kv_aware#2") == ("kv_aware", "2") and split_copy("kv_aware") == \
        ("kv_aware", "")
    assert stack_policies(["kv_aware", "kv_aware#2", "gateway:kv_aware#b"], True) == \
        ["kv_aware", "kv_aware#2", "gateway:kv_aware#b"]
    with pytest.raises(ConfigError, match="kv_aware,kv_aware#2"):
        stack_policies(["kv_aware", "kv_aware"], True)
    with pytest.raises(ConfigError, match="only in --mode sim"):
        stack_policies(["lru#2"], True)
