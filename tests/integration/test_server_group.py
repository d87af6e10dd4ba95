"""tests.harness.ServerGroup with real processes: it stops exactly the servers it started,
newest first, and a stack whose later start fails leaks none of the earlier ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import ServerGroup

pytestmark = pytest.mark.integration

ENGINE = ["--time-scale", "0.01", "--block-size", "16", "--capacity-blocks", "16"]


def test_stops_what_it_started_newest_first(tmp_path: Path) -> None:
    with ServerGroup(tmp_path) as group:
        a = group.start("engine-sim", ENGINE, "a")
        b = group.start("engine-sim", ENGINE, "b")
        assert [s.process.name for s in group.servers] == ["a", "b"]
        assert a.process.alive() and b.process.alive()
    assert not a.process.alive() and not b.process.alive()
    assert a.process.proc is not None and b.process.proc is not None
    assert a.process.proc.returncode == 0 and b.process.proc.returncode == 0  # SIGTERM: clean
    group.stop()  # again: a no-op


def test_failed_start_stops_the_others(tmp_path: Path) -> None:
    group = ServerGroup(tmp_path)
    with pytest.raises(Exception), group.stopped_on_error():  # noqa: B017 (any start error)
        first = group.start("engine-sim", ENGINE, "first")
        group.start("engine-sim", [*ENGINE, "--capacity-blocks", "-1"], "bad", timeout_s=15)
    assert not first.process.alive()
