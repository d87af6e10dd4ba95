"""Router settings and startup errors name the flag; `kvroute route` argument errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kvroute.errors import ConfigError
from kvroute.settings import add_arguments, from_namespace
from router_service.settings import RouterSettings


def test_settings_validate_and_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--registry"):
        RouterSettings()
    with pytest.raises(ConfigError, match="--registry-mode"):
        RouterSettings(registry="127.0.0.1:1", registry_mode="poll")
    with pytest.raises(ConfigError, match="--tokenizer-file"):
        RouterSettings(registry="127.0.0.1:1", tokenizer="hf")
    assert RouterSettings(registry="127.0.0.1:1").registry_mode == "mirror"


def test_former_names_of_the_mirror_mode_are_still_read() -> None:
    """``replica`` (mode) and ``--replica-max-staleness-s`` keep working after the rename."""
    assert RouterSettings(registry="127.0.0.1:1", registry_mode="replica").registry_mode == "mirror"
    parser = argparse.ArgumentParser()
    add_arguments(parser, RouterSettings)
    ns = parser.parse_args(["--registry", "127.0.0.1:1", "--replica-max-staleness-s", "7"])
    assert from_namespace(RouterSettings, ns, environ={}).mirror_max_staleness_s == 7.0
    ns = parser.parse_args(["--registry", "127.0.0.1:1"])
    env = {"KVROUTE_REPLICA_MAX_STALENESS_S": "9"}
    assert from_namespace(RouterSettings, ns, environ=env).mirror_max_staleness_s == 9.0
    env["KVROUTE_MIRROR_MAX_STALENESS_S"] = "11"
    assert from_namespace(RouterSettings, ns, environ=env).mirror_max_staleness_s == 11.0


def test_serve_router_refuses_unknown_default_policy() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "router", "--registry", "127.0.0.1:1",
         "--default-policy", "nope"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "--default-policy: unknown policy 'nope'" in proc.stderr
