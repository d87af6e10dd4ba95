"""Several registry addresses: validation (a clear error, never a channel that cannot connect)
and rotation; the router's and the agent's --registry use it."""

from __future__ import annotations

import pytest

from kvroute.errors import ConfigError
from kvroute.targets import TargetRing, parse_targets
from node_agent.settings import AgentSettings
from router_service.settings import RouterSettings


def test_lists_and_single_addresses_parse() -> None:
    assert parse_targets("a:1", "registry") == ("a:1",)
    assert parse_targets(" a:1 , b:2,[::1]:3", "registry") == ("a:1", "b:2", "[::1]:3")
    assert parse_targets("dns:///registry-headless.ns.svc:50051", "registry") == (
        "dns:///registry-headless.ns.svc:50051",)


@pytest.mark.parametrize(("value", "text"), [
    ("host1,host2", "every address needs HOST:PORT; 'host1'"),
    ("a:1,", "no empty entries"),
    ("", "expected HOST:PORT"),
    ("a:1,a:1", "listed twice"),
    ("a:99999", "out of range"),
    ("http://a:1", "not HOST:PORT"),
])
def test_bad_lists_name_the_flag_and_the_entry(value: str, text: str) -> None:
    with pytest.raises(ConfigError, match="--registry") as exc:
        parse_targets(value, "registry")
    assert text in str(exc.value)


def test_router_and_agent_settings_validate_the_list() -> None:
    assert RouterSettings(registry="a:1,b:2").registry == "a:1,b:2"
    with pytest.raises(ConfigError, match="host1"):
        RouterSettings(registry="host1,host2")
    with pytest.raises(ConfigError, match="host1"):
        AgentSettings(registry="host1,host2", node_id="n", engine_url="http://e:1",
                      model="m", capacity_blocks=1)


def test_ring_rotates_and_counts_switches() -> None:
    ring = TargetRing("a:1,b:2,c:3")
    assert ring.current == "a:1" and len(ring) == 3
    assert [ring.advance() for _ in range(4)] == ["b:2", "c:3", "a:1", "b:2"]
    assert ring.switches == 4 and "of a:1,b:2,c:3" in ring.describe()
    one = TargetRing(("a:1",))
    assert one.advance() == "a:1" and one.switches == 0 and one.describe() == "a:1"
