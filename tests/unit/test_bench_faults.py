"""`kvroute bench --mode stack --fault`: spec parsing (clear errors) and the fault metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.faults import FaultInjector, FaultSpec, Window, parse_faults, registries_needed
from bench.stack_fleet import StackFleet
from kvroute.errors import ConfigError


def test_specs_parse_in_time_order_with_defaults() -> None:
    specs = parse_faults("pause-etcd@60+3, kill-registry@30,kill-engine:engine-1@90,"
                         "rolling-restart-registries@120,restart-etcd@5+2.5")
    assert [str(s) for s in specs] == [
        "restart-etcd@5+2.5", "kill-registry@30+2", "pause-etcd@60+3",
        "kill-engine:engine-1@90", "rolling-restart-registries@120"]
    assert registries_needed(specs) == 2 and registries_needed(specs[:2]) == 1
    assert parse_faults("sigterm-registry@1")[0].duration_s == 1.0


@pytest.mark.parametrize(("text", "msg"), [
    ("explode@3", "expected KIND[:NODE]@T[+D]"),
    ("kill-engine@3", "needs a node"),
    ("kill-registry:engine-1@3", "takes no node"),
    ("pause-etcd@3", "needs a duration"),
    ("kill-registry", "expected KIND"),
])
def test_bad_specs_say_what_is_accepted(text: str, msg: str) -> None:
    with pytest.raises(ConfigError, match="--fault") as exc:
        parse_faults(text)
    assert msg in str(exc.value)


@dataclass
class Out:
    node_id: str
    error: str = ""
    degraded: bool = False
    t_route_s: float = 0.0


def test_summary_counts_window_and_steady_state(tmp_path: Path) -> None:
    inj = FaultInjector(StackFleet(tmp_path), [FaultSpec("kill-engine", 10.0, 0.0, "n1")],
                        time_scale=0.05, recovery_s=5.0)
    inj.windows = [Window(inj.specs[0], 10.0, 10.5, dead_node="n1")]
    inj.placements_lost = lambda dead: 0  # type: ignore[method-assign]  # no fleet running
    outs = [Out("n0", t_route_s=1.0), Out("n1", t_route_s=5.0),   # steady
            Out("n1", t_route_s=11.0, error="engine: refused"),  # names the dead node
            Out("n0", t_route_s=12.0, degraded=True),            # blind, in the window
            Out("n0", t_route_s=30.0)]                           # steady again
    s = inj.summarize(outs, [100] * 5, [50, 50, 0, 0, 100],
                      baseline=([100] * 5, [50, 50, 40, 60, 100]))
    assert s["failed"] == 1 and s["decisions_naming_dead_node"] == 1
    assert s["blind_decisions"] == 1 and math.isclose(s["blind_fraction"], 0.2)
    assert s["requests_fault_window"] == 2 and s["requests_steady"] == 3  # failed ones count
    assert s["hit_rate_fault_window"] == 0.0
    assert math.isclose(s["hit_rate_fault_window_without_faults"], 0.5)
    assert math.isclose(s["hit_rate_steady"], 200 / 300)
    assert math.isclose(s["hit_rate_run"], 0.4)
    assert math.isclose(s["hit_rate_run_without_faults"], 0.6)
    assert inj.dead_nodes == {"n1"} and s["faults"] == ["kill-engine:n1@10"]
