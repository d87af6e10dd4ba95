"""Typed settings: flags, KVROUTE_* variables, defaults, validation."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import pytest

from kvroute.common_settings import ServerSettings
from kvroute.errors import ConfigError
from kvroute.settings import (
    add_arguments,
    add_value_arguments,
    describe,
    env_name,
    from_namespace,
    setting,
    value_arguments,
)


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


@dataclass(frozen=True)
class Knobs:
    """Benchmark knobs: flags whose parsed value is the value (add_value_arguments)."""

    nodes: tuple[int, ...] = setting((8, 128), "fleet sizes (default %(default)s)",
                                     metavar="N,N")
    rate_per_s: float = setting(5.0, "a rate", flag="--knob-rate")
    count: int = setting(3, "a count")
    name: str | None = setting(None, "a name", choices=("a", "b"))
    quick: bool = setting(False, "a switch")
    gc: bool = setting(True, "turn it off")
    hidden: int = 7


def test_value_arguments_round_trip() -> None:
    p = argparse.ArgumentParser()
    add_value_arguments(p, Knobs, prefix="knob-")
    flags = {s for a in p._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == {"--knob-nodes", "--knob-rate", "--knob-count", "--knob-name",
                     "--knob-quick", "--no-knob-gc"}
    assert "fleet sizes (default 8,128)" in " ".join(p.format_help().split())
    default = value_arguments(Knobs, p.parse_args([]), prefix="knob-")
    assert default == {"nodes": "8,128", "rate_per_s": 5.0, "count": 3, "name": None,
                       "quick": False, "gc": True}
    given = value_arguments(Knobs, p.parse_args(
        ["--knob-rate", "2.5", "--knob-count", "4", "--knob-name", "b", "--knob-quick",
         "--no-knob-gc", "--knob-nodes", "1,2"]), prefix="knob-")
    assert given == {"nodes": "1,2", "rate_per_s": 2.5, "count": 4, "name": "b",
                     "quick": True, "gc": False}
    assert Knobs(**{**given, "nodes": (1, 2)}).hidden == 7
    with pytest.raises(SystemExit):
        p.parse_args(["--knob-name", "c"])
