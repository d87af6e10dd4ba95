"""Typed settings: flags, KVROUTE_* variables, defaults, validation."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import pytest

from kvroute.common_settings import ServerSettings
from kvroute.errors import ConfigError
from kvroute.settings import add_arguments, describe, env_name, from_namespace, setting


@dataclass(frozen=True)
class Demo(ServerSettings):
    """Example settings."""

    endpoints: tuple[str, ...] = setting(("a:1",), "endpoints")
    ratio: float = setting(0.5, "a ratio")
    count: int = setting(3, "a count")
    enabled: bool = setting(False, "a switch")
    password: str = setting("", "secret")


def parse(argv: list[str], env: dict[str, str] | None = None, **kw: object) -> Demo:
    p = argparse.ArgumentParser()
    add_arguments(p, Demo)
    return from_namespace(Demo, p.parse_args(argv), env or {}, **kw)


def test_defaults() -> None:
    s = parse([])
    assert s.listen == "127.0.0.1:0" and s.count == 3 and s.endpoints == ("a:1",)


def test_flag_beats_env_beats_default() -> None:
    env = {"KVROUTE_COUNT": "7", "KVROUTE_RATIO": "0.25", "KVROUTE_ENDPOINTS": "x:1, y:2"}
    s = parse(["--count", "9"], env)
    assert s.count == 9 and s.ratio == 0.25 and s.endpoints == ("x:1", "y:2")


def test_bool_flags_and_env() -> None:
    assert parse(["--enabled"]).enabled is True
    assert parse([], {"KVROUTE_ENABLED": "yes"}).enabled is True
    assert parse(["--no-enabled"], {"KVROUTE_ENABLED": "1"}).enabled is False


def test_bad_values_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--count"):
        parse(["--count", "many"])
    with pytest.raises(ConfigError, match="--listen"):
        parse(["--listen", "nohost"])
    with pytest.raises(ConfigError, match="--log-format"):
        parse(["--log-format", "xml"])
    with pytest.raises(ConfigError, match="together"):
        parse(["--tls-cert-file", "c.pem"])


def test_every_field_is_documented() -> None:
    for f in fields(Demo):
        assert f.metadata.get("help"), f.name


def test_help_mentions_env_and_default() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p, Demo)
    text = p.format_help()
    assert "KVROUTE_ETCD" not in text
    assert env_name("count") in text and "default: 3" in text


def test_describe_masks_secrets() -> None:
    assert describe(parse([], password="hunter2"))["password"] == "***"
