"""The offloaded (lower) tier and incomplete indexes on the router side: the index mirror,
kv_aware's credit, and what the routing core reports."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import pytest

from kvroute.blocks import hash_blocks
from kvroute.errors import ConfigError
from kvroute.v1 import registry_pb2
from router_service.core import RouterCore
from router_service.domain import RouteRequest
from router_service.index_mirror import IndexMirror
from router_service.load import LoadTracker
from router_service.lookup import PlacementLookup
from router_service.placement import NodeState, Placement
from router_service.policies.base import NodeView, RequestView, choose_and_commit
from router_service.policies.factory import PolicySet
from router_service.policies.kv_aware import KvAwarePolicy, KvAwareSettings
from router_service.settings import RouterSettings
from router_service.tokenizer import load_tokenizer
from tests.unit.test_router_servicer import BS, MemorySource

PE = registry_pb2.PlacementEvent


def _upsert(nid: str) -> registry_pb2.PlacementEvent:
    return PE(kind=PE.NODE_UPSERT, node_id=nid, block_size=16,
              node=registry_pb2.NodeInfo(node_id=nid, address=f"{nid}:1", model="m",
                                         healthy=True))


def test_mirror_follows_offloaded_events_and_walks_gpu_then_cpu() -> None:
    ix = IndexMirror()
    for ev in (_upsert("a"), _upsert("b"),
               PE(kind=PE.BLOCKS, node_id="a", stored=[1, 2]),
               PE(kind=PE.BLOCKS, node_id="a", stored_offloaded=[1, 2, 3, 4]),
               PE(kind=PE.BLOCKS, node_id="b", stored_offloaded=[1, 2, 3])):
        ix.apply(ev)
    pairs, off = ix.lookup_tiers([1, 2, 3, 4, 5], "m")
    assert {n.node_id: m for n, m in pairs} == {"a": 2, "b": 0}
    assert off == {"a": 2, "b": 3}
    assert ix.offloaded_matches([1, 2, 3, 4, 5], "m") == off
    assert ix.blocks_of("a") == 2 and ix.blocks_of("a", 1) == 4
    # GPU eviction of block 2, kept on CPU: it moves tiers
    ix.apply(PE(kind=PE.BLOCKS, node_id="a", removed=[2]))
    assert ix.lookup_tiers([1, 2, 3, 4], "m")[1]["a"] == 3
    # an offloaded removal removes that tier only; cleared drops both
    ix.apply(PE(kind=PE.BLOCKS, node_id="a", removed_offloaded=[1, 2, 3, 4]))
    pairs, off = ix.lookup_tiers([1, 2], "m")
    assert dict((n.node_id, m) for n, m in pairs)["a"] == 1 and "a" not in off
    ix.apply(PE(kind=PE.BLOCKS, node_id="b", cleared=True))
    assert ix.lookup_tiers([1, 2], "m")[1] == {}


def test_reusable_tiers_follow_the_engines_block_size_and_last_token() -> None:
    n = NodeState("a", "a:1", "m", engine_block_size=32)
    # 1 GPU block of 16 is half an engine block: not reusable; with 2 offloaded blocks the
    # run is 3 blocks = 48 tokens -> 32 reusable: 0 on GPU, 2 loaded from the offload tier
    assert n.reusable_tiers(1, 2, 16, 200) == (0, 2)
    m = NodeState("b", "b:1", "m")
    assert m.reusable_tiers(2, 2, 16, 64) == (2, 1)  # the last token is always recomputed
    assert m.reusable_tiers(2, 0, 16, 64) == (2, 0)


def _node(i: int, matched: int = 0, offloaded: int = 0, inflight: int = 0,
          complete: bool = True) -> NodeView:
    return NodeView(f"n{i}", f"n{i}:1", matched, inflight, 0, 0, 0, 1000, 0.0,
                    offloaded_blocks=offloaded, index_complete=complete)


def _req(blocks: int = 64) -> RequestView:
    return RequestView("r", list(range(blocks)), blocks * 16, 16)


def test_offloaded_blocks_earn_less_credit_than_gpu_blocks() -> None:
    gpu, cpu, none = _node(0, matched=32), _node(1, offloaded=32), _node(2)
    assert choose_and_commit(KvAwarePolicy(), _req(), [cpu, gpu, none]).node_id == "n0"
    d = choose_and_commit(KvAwarePolicy(), _req(), [none, cpu])
    assert d.node_id == "n1" and "512 tokens offloaded" in d.reason
    assert d.candidates[0].offloaded_blocks == 32
    # GPU then CPU credit: 16 on GPU + 32 offloaded beats 32 on GPU alone
    assert choose_and_commit(KvAwarePolicy(), _req(),
                             [gpu, _node(3, matched=16, offloaded=32)]).node_id == "n3"
    # weight 0 ignores the tier, weight 1 makes it as good as a GPU hit
    zero = KvAwarePolicy(KvAwareSettings(kv_weight_offloaded=0.0))
    s0 = zero.prefill.scores(zero.cycle(_req(), [none, cpu]))
    assert s0[0] == s0[1]
    one = KvAwarePolicy(KvAwareSettings(kv_weight_offloaded=1.0))
    s1 = one.prefill.scores(one.cycle(_req(), [gpu, cpu]))
    assert s1[0] == s1[1]


def test_offloaded_credit_never_counts_blocks_twice() -> None:
    """Blocks routed there moments ago (recent routes) already count as cached: offloaded
    blocks earn credit only beyond the effective overlap."""
    pol = KvAwarePolicy()
    cyc = pol.cycle(_req(), [_node(0, matched=8, offloaded=8)])
    cyc.matched[0] = 12  # raised by recent routes
    assert pol.prefill.offloaded_tokens(cyc, 0) == 4 * 16
    cyc.matched[0] = 20
    assert pol.prefill.offloaded_tokens(cyc, 0) == 0


def test_an_incomplete_index_is_not_evidence_of_a_miss() -> None:
    hit, miss = _node(0, matched=48), _node(1)
    unknown = _node(2, complete=False)
    # known hit > unknown > known miss (a fresh policy each time: no recent routes)
    assert choose_and_commit(KvAwarePolicy(), _req(), [miss, unknown, hit]).node_id == "n0"
    d = choose_and_commit(KvAwarePolicy(), _req(), [miss, unknown])
    assert d.node_id == "n2" and "index incomplete" in d.reason
    # it loses to a node known to hold more than ~1/5 of the prompt, wins against less
    small, fair = _node(3, matched=8), _node(4, matched=24)
    assert choose_and_commit(KvAwarePolicy(), _req(), [small, unknown]).node_id == "n2"
    assert choose_and_commit(KvAwarePolicy(), _req(), [fair, unknown]).node_id == "n4"
    # its load still counts in full
    busy_unknown = dataclasses.replace(unknown, inflight=5)
    assert choose_and_commit(KvAwarePolicy(), _req(), [miss, busy_unknown]).node_id == "n1"
    # weight 1 trusts the index: unknown and known miss score alike
    trust = KvAwarePolicy(KvAwareSettings(kv_weight_unknown_index_miss=1.0))
    s = trust.prefill.scores(trust.cycle(_req(), [miss, unknown]))
    assert s[0] == s[1]


@pytest.mark.parametrize("field", ["kv_weight_offloaded", "kv_weight_unknown_index_miss"])
@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_tier_weights_are_validated(field: str, bad: float) -> None:
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        KvAwareSettings(**{field: bad})


class _MirrorSource:
    """A local narrowing source over an IndexMirror (what MirrorSource reads from)."""

    local = True

    def __init__(self, ix: IndexMirror) -> None:
        self.ix = ix

    def members(self, model: str) -> list[NodeState]:
        return self.ix.members(model)

    def node(self, node_id: str) -> NodeState | None:
        return self.ix.nodes.get(node_id)

    def registry_block_size(self) -> int:
        return 16

    def matches_local(self, hashes: Sequence[int], model: str) -> dict[str, int]:
        return self.ix.matches(hashes, model)

    def offloaded_local(self, hashes: Sequence[int], model: str) -> dict[str, int]:
        return self.ix.offloaded_matches(hashes, model)

    def lookup_local(self, hashes: Sequence[int], model: str) -> Placement:
        pairs, off = self.ix.lookup_tiers(hashes, model)
        return Placement(pairs, 16, off)


def test_narrowing_a_large_fleet_keeps_nodes_holding_the_prefix_offloaded() -> None:
    """On a fleet larger than --max-candidates, a node whose match is mostly on its CPU tier
    ranks by its whole run and reaches the decision with its offloaded blocks."""
    ix = IndexMirror()
    for i in range(100):
        ix.upsert(NodeState(f"n{i:03}", f"h{i}:1", "m"))
    hashes = list(range(64))  # what _req(64) carries
    ix.apply_blocks("n042", hashes[:2], (), False)
    ix.apply_offloaded("n042", hashes[:40], ())
    ix.apply_offloaded("n077", hashes[:30], ())  # offloaded only
    busy = LoadTracker(time.monotonic)
    for i in range(100):  # every node busy: only the best matches are candidates by match
        busy.start(f"r{i}", f"n{i:03}", 0, 0)
    look = PlacementLookup(_MirrorSource(ix), busy, max_candidates=8)  # type: ignore[arg-type]
    placement, why, view = look.local(KvAwarePolicy(), _req(64), "m")
    assert placement is not None and not why and view.fleet_nodes == 100
    got = {n.node_id: m for n, m in placement.nodes}
    assert got["n042"] == 2 and got["n077"] == 0
    assert placement.offloaded == {"n042": 38, "n077": 30}


class _TieredSource(MemorySource):
    """MemorySource with an offloaded tier per node."""

    def __init__(self) -> None:
        super().__init__()
        self.low: dict[str, set[int]] = {}

    def lookup_local(self, block_hashes: Sequence[int], model: str) -> Placement:
        p = super().lookup_local(block_hashes, model)
        for n, m in p.nodes:
            k = m
            while k < len(block_hashes) and block_hashes[k] in self.low.get(n.node_id, ()):
                k += 1
            if k > m:
                p.offloaded[n.node_id] = k - m
        return p


def test_the_decision_reports_gpu_and_offloaded_tokens_apart() -> None:
    prompt = list(range(700, 700 + 8 * BS))
    hashes = hash_blocks(prompt, BS)
    src = _TieredSource()
    src.add("a", hashes[:2])
    src.low["a"] = set(hashes[:6])
    src.add("b", hashes[:4])
    core = RouterCore(RouterSettings(registry="127.0.0.1:1"), PolicySet(), src,
                      LoadTracker(time.monotonic), load_tokenizer("simple"))
    d = core.decide_local(RouteRequest("r1", token_ids=prompt))
    # a: 2 GPU + 4 offloaded blocks (credited 2 + 0.75 x 4 = 5) beats b's 4 GPU blocks
    assert (d.node_id, d.matched_blocks, d.expected_cached_tokens) == ("a", 2, 2 * BS)
    assert (d.offloaded_blocks, d.expected_offloaded_tokens) == (4, 4 * BS)
    assert "64 tokens offloaded" in d.reason
    core.complete("r1")
    # an incomplete index: the node missing the prefix is not read as a certain miss
    src.nodes["b"].index_state = 3  # INDEX_STATE_NO_EVENTS
    src.blocks["b"] = set()
    src.add("c")
    d2 = core.decide_local(RouteRequest("r2", token_ids=list(range(9000, 9000 + 8 * BS))))
    assert d2.node_id == "b" and "index incomplete" in d2.reason
