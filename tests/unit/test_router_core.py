"""The routing core on plain types: subset hints, exclusions, fallbacks, suspects, commit."""

from __future__ import annotations

import pytest

from kvroute.blocks import hash_blocks
from kvroute.errors import InvalidArgument, Unavailable
from router_service.core import RouterCore
from router_service.domain import RouteRequest
from router_service.load import LoadTracker
from router_service.policies.factory import PolicySet
from router_service.settings import RouterSettings
from router_service.tokenizer import load_tokenizer
from tests.unit.test_router_servicer import BS, MemorySource

PROMPT = list(range(500, 500 + 8 * BS))
HASHES = hash_blocks(PROMPT, BS)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _core(clock: Clock | None = None) -> tuple[RouterCore, MemorySource]:
    src = MemorySource()
    src.add("a", HASHES[:6])
    src.add("b", HASHES[:2])
    src.add("c")
    clk = clock or Clock()
    core = RouterCore(RouterSettings(registry="127.0.0.1:1"), PolicySet(), src,
                      LoadTracker(clk), load_tokenizer("simple"), clock=clk)
    return core, src


def test_decide_local_answers_with_address_cached_tokens_and_fallbacks() -> None:
    core, _ = _core()
    d = core.decide_local(RouteRequest("r1", token_ids=PROMPT))
    assert (d.node_id, d.address, d.matched_blocks) == ("a", "a:8000", 6)
    assert d.expected_cached_tokens == 6 * BS and d.prompt_tokens == len(PROMPT)
    assert d.fallback_addresses and "a:8000" not in d.fallback_addresses
    assert core.tracker.inflight("a") == 1
    assert core.complete("r1", cached_tokens=96) and not core.complete("r1")
    assert core.reported_cached_tokens == 96


def test_subset_hint_and_exclusions_restrict_the_choice() -> None:
    core, _ = _core()
    d = core.decide_local(RouteRequest("r1", token_ids=PROMPT, allowed=frozenset({"b:8000"})))
    assert d.node_id == "b"
    core.complete("r1")
    d = core.decide_local(RouteRequest("r2", token_ids=PROMPT, excluded=frozenset({"a"})))
    assert d.node_id == "b"  # next-longest prefix
    with pytest.raises(Unavailable, match="subset hint"):
        core.decide_local(RouteRequest("r3", token_ids=PROMPT, allowed=frozenset({"zz"})))


def test_a_suspect_node_is_avoided_until_its_hold_expires() -> None:
    clk = Clock()
    core, _ = _core(clk)
    core.mark_suspect("a", "connect refused")
    assert core.decide_local(RouteRequest("r1", token_ids=PROMPT)).node_id != "a"
    clk.t += 10.0
    assert core.decide_local(RouteRequest("r2", token_ids=PROMPT)).node_id == "a"


def test_suspicion_never_leaves_no_node() -> None:
    core, _ = _core()
    for nid in ("a", "b", "c"):
        core.mark_suspect(nid, "test")
    assert core.decide_local(RouteRequest("r1", token_ids=PROMPT)).node_id == "a"


def test_bad_input_is_refused_with_the_field_named() -> None:
    core, _ = _core()
    with pytest.raises(InvalidArgument, match="request_id"):
        core.decide_local(RouteRequest("", token_ids=PROMPT))
    with pytest.raises(InvalidArgument, match="token_ids"):
        core.decide_local(RouteRequest("r", token_ids=[-1, 2]))
    with pytest.raises(InvalidArgument, match="token_ids"):
        core.decide_local(RouteRequest("r", token_ids=[2**70, 2]))
    with pytest.raises(InvalidArgument, match="num_prompt_tokens"):
        core.decide_local(RouteRequest("r", block_hashes=HASHES[:4], num_prompt_tokens=10))
    with pytest.raises(InvalidArgument, match="cached_tokens"):
        core.complete("r", cached_tokens=-1)


def test_a_departed_nodes_queued_prefill_is_forgotten() -> None:
    core, src = _core()  # the clock stands still: the estimate does not drain by itself
    d = core.decide_local(RouteRequest("r0", token_ids=PROMPT, policy="least_loaded"))
    core.tracker.set_rate(d.node_id, 5000.0)
    assert core.tracker.pending_prefill(d.node_id) > 0
    src.remove(d.node_id)  # the source reports the departure: forgotten at once
    assert core.tracker.pending_prefill(d.node_id) == 0
    assert core.tracker.rate(d.node_id) != 5000.0
    assert d.node_id not in core.tracker.pending_nodes()
    # departures no source reported: the periodic sweep drops them
    d2 = core.decide_local(RouteRequest("r1", token_ids=PROMPT, policy="least_loaded"))
    assert core.tracker.pending_nodes() == [d2.node_id]
    for n in list(src.nodes):
        del src.nodes[n]
    core._forget_departed()
    assert core.tracker.pending_nodes() == []


def test_a_large_fleet_is_narrowed_to_the_best_matches_and_the_least_loaded() -> None:
    from router_service.index_mirror import IndexMirror
    from router_service.narrowing import Narrower
    from router_service.placement import NodeState

    mirror = IndexMirror()
    for i in range(100):
        mirror.upsert(NodeState(f"n{i:03}", f"h{i}:1", "m"))
    mirror.apply_blocks("n042", HASHES[:5], (), False)
    mirror.apply_blocks("n007", HASHES[:2], (), False)
    narrower = Narrower(8)
    counts = {f"n{i:03}": 3 for i in range(0, 100, 2)}  # even nodes busy
    pairs = narrower.select(mirror.members("m"), mirror.matches(HASHES, "m"),
                            mirror.nodes.get, counts)
    got = {n.node_id: m for n, m in pairs}
    assert got["n042"] == 5 and got["n007"] == 2
    assert len(got) <= 8
    idle = [nid for nid in got if nid not in ("n042", "n007")]
    assert idle and all(nid not in counts for nid in idle)
