"""Agent settings: required fields, validation messages naming the flag, env variables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kvroute.errors import ConfigError
from kvroute.settings import add_arguments, from_namespace
from node_agent.settings import AgentSettings, fleet_agents

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
    ({"role": "encoder"}, "--role"),
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


def test_fleet_file_expands_to_one_validated_agent_per_entry(tmp_path: Path) -> None:
    f = tmp_path / "agents.json"
    entry = {"node_id": "e-0", "engine_url": "http://127.0.0.1:1",
             "engine_events": "tcp://127.0.0.1:2", "engine_replay": "tcp://127.0.0.1:3",
             "capacity_blocks": 64}
    f.write_text(json.dumps([entry, {**entry, "node_id": "e-1", "labels": ["zone=b"],
                                     "role": "decode"}]))
    base = AgentSettings(model="m", fleet_file=str(f), heartbeat_interval_s=0.05)
    agents = fleet_agents(base)
    assert [a.node_id for a in agents] == ["e-0", "e-1"]
    assert all(a.heartbeat_interval_s == 0.05 and a.model == "m" and not a.fleet_file
               for a in agents)
    assert agents[1].label_map == {"zone": "b"}
    assert (agents[0].role, agents[1].role) == ("both", "decode")
    assert fleet_agents(AgentSettings(**BASE)) == [AgentSettings(**BASE)]  # type: ignore[arg-type]


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot read"),
    ("[]", "non-empty JSON list"),
    ('[{"node_id": "a", "colour": 1}]', "unknown field"),
    ('[{"node_id": 5}]', "node_id must be a str"),
    ('[{"node_id": "bad id", "engine_url": "http://x", "capacity_blocks": 1}]',
     "entry 0: --node-id"),
    ('[{"node_id": "a", "engine_url": "http://x", "capacity_blocks": 1},'
     ' {"node_id": "a", "engine_url": "http://y", "capacity_blocks": 1}]', "distinct"),
])
def test_fleet_file_errors_name_the_entry(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "agents.json"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        fleet_agents(AgentSettings(model="m", fleet_file=str(f)))
    with pytest.raises(ConfigError, match="cannot read"):
        fleet_agents(AgentSettings(model="m", fleet_file=str(tmp_path / "missing.json")))
