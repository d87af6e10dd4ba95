"""``--repeat`` and ``--sim-runs`` are checked once, in :class:`bench.stack_settings.StackSettings`,
for every mode and path of ``kvroute bench`` (aggregated and disaggregated)."""

from __future__ import annotations

import pytest

from bench.stack_settings import StackSettings
from cli.main import main
from kvroute.errors import ConfigError

_SMALL = ["bench", "--workload", "mooncake-sample", "--limit", "20", "--no-progress",
          "--policies", "round_robin"]


@pytest.mark.parametrize("flags", [[], ["--prefill-nodes", "1", "--decode-nodes", "1"]],
                         ids=["aggregated", "disaggregated"])
@pytest.mark.parametrize("bad", [["--repeat", "0"], ["--repeat", "-2"], ["--sim-runs", "-1"]])
def test_out_of_range_counts_are_refused_on_every_path(
        flags: list[str], bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_SMALL, *flags, *bad]) == 2
    err = capsys.readouterr().err
    assert f"{bad[0]}: {bad[1]}" in err and (">= 1" in err or ">= 0" in err)


def test_the_settings_validate_themselves() -> None:
    with pytest.raises(ConfigError, match="--repeat"):
        StackSettings(repeat=0)
    with pytest.raises(ConfigError, match="--sim-runs"):
        StackSettings(sim_runs=-1)
    assert StackSettings(repeat=3, sim_runs=0).repeat == 3
