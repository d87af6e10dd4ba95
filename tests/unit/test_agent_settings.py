"""Agent settings: required fields, validation messages naming the flag, env variables."""

from __future__ import annotations

import argparse

import pytest

from kvroute.errors import ConfigError
from kvroute.settings import add_arguments, from_namespace
from node_agent.settings import AgentSettings

BASE = {"node_id": "pod-0", "engine_url": "http://10.0.0.5:8000", "model": "m",
        "capacity_blocks": 100}


def test_minimal_settings_and_labels() -> None:
    s = AgentSettings(**BASE, labels=("zone=a", "gpu=h100"))  # type: ignore[arg-type]
    assert s.label_map == {"zone": "a", "gpu": "h100"}
    assert s.engine_format == "vllm" and s.medium_policy == "device"


@pytest.mark.parametrize(("override", "flag"), [
    ({"node_id": ""}, "--node-id"),
    ({"node_id": "bad id"}, "--node-id"),
    ({"engine_url": ""}, "--engine-url"),
    ({"capacity_blocks": 0}, "--capacity-blocks"),
    ({"engine_events": "tcp://*:5557"}, "--engine-events"),
    ({"engine_events": "http://x"}, "--engine-events"),
    ({"engine_format": "trt"}, "--engine-format"),
    ({"medium_policy": "weighted"}, "--medium-policy"),
    ({"labels": ("novalue",)}, "--labels"),
    ({"registry": "nohostport"}, "--registry"),
])
def test_invalid_settings_name_the_flag(override: dict[str, object], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        AgentSettings(**{**BASE, **override})  # type: ignore[arg-type]


def test_capacity_may_come_from_engine_metrics() -> None:
    s = AgentSettings(**{**BASE, "capacity_blocks": 0,  # type: ignore[arg-type]
                         "engine_metrics_url": "http://127.0.0.1:8000/metrics"})
    assert s.capacity_blocks == 0


def test_flags_and_env() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p, AgentSettings)
    ns = p.parse_args(["--node-id", "pod-1", "--engine-url", "http://e:8000", "--model", "m",
                       "--engine-events", "tcp://127.0.0.1:6000"])
    env = {"KVROUTE_CAPACITY_BLOCKS": "512", "KVROUTE_NODE_ID": "ignored",
           "KVROUTE_DEVICE_MEDIA": "GPU,HBM"}
    s = from_namespace(AgentSettings, ns, environ=env)
    assert (s.node_id, s.capacity_blocks, s.device_media) == ("pod-1", 512, ("GPU", "HBM"))
