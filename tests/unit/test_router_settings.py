"""Router settings and startup errors name the flag; `kvroute route` argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvroute.errors import ConfigError
from router_service.settings import RouterSettings


def test_settings_validate_and_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--registry"):
        RouterSettings()
    with pytest.raises(ConfigError, match="--registry-mode"):
        RouterSettings(registry="127.0.0.1:1", registry_mode="poll")
    with pytest.raises(ConfigError, match="--tokenizer-file"):
        RouterSettings(registry="127.0.0.1:1", tokenizer="hf")
    assert RouterSettings(registry="127.0.0.1:1").registry_mode == "replica"


def test_serve_router_refuses_unknown_default_policy() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "router", "--registry", "127.0.0.1:1",
         "--default-policy", "nope"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "--default-policy: unknown policy 'nope'" in proc.stderr
