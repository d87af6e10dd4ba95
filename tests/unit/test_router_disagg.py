"""Disaggregated prefill/decode in the routing core: roles, pairs, decode choice, accounting."""

from __future__ import annotations

import grpc
import pytest

from kvroute.blocks import hash_blocks
from kvroute.errors import FailedPrecondition, InvalidArgument, Unavailable
from kvroute.v1 import router_pb2, router_pb2_grpc
from router_service.core import RouterCore
from router_service.disagg import DisaggSettings, check_role, wants_pd
from router_service.domain import RouteRequest
from router_service.load import LoadTracker
from router_service.policies.factory import PolicySet
from router_service.servicer import RouterServicer
from router_service.settings import RouterSettings
from router_service.tokenizer import load_tokenizer
from tests.unit.test_router_servicer import BS, MemorySource

PROMPT = list(range(500, 500 + 8 * BS))
HASHES = hash_blocks(PROMPT, BS)


def _core(roles: dict[str, tuple[str, int]], disagg: DisaggSettings | None = None,
          ) -> tuple[RouterCore, MemorySource]:
    """Nodes by id -> (role, prefix blocks of HASHES held)."""
    src = MemorySource()
    for nid, (role, held) in roles.items():
        src.add(nid, HASHES[:held])
        src.nodes[nid].role = role
    core = RouterCore(RouterSettings(registry="127.0.0.1:1"), PolicySet(), src,
                      LoadTracker(lambda: 0.0), load_tokenizer("simple"), disagg=disagg)
    return core, src


def test_roles_and_when_a_request_goes_disaggregated() -> None:
    assert check_role("") == "both" and check_role("Decode") == "decode"
    with pytest.raises(ValueError, match="role"):
        check_role("encoder")
    assert wants_pd(["prefill", "decode", "both"], None)
    assert not wants_pd(["prefill", "both"], None)
    assert wants_pd(["both"], True) and not wants_pd(["prefill", "decode"], False)


def test_pair_prefill_by_prefix_decode_by_held_blocks_with_a_reason_each() -> None:
    core, _ = _core({"p0": ("prefill", 6), "p1": ("prefill", 0),
                     "d0": ("decode", 0), "d1": ("decode", 7)})
    d = core.decide_local(RouteRequest("r1", token_ids=PROMPT))
    assert d.disaggregated and (d.node_id, d.decode_node_id) == ("p0", "d1")
    assert d.decode_address == "d1:8000" and d.decode_matched_blocks == 7
    assert d.transfer_blocks == 1  # 8 prompt blocks, 7 already on d1
    assert "kv_aware" in d.reason and "holds 7 blocks" in d.decode_reason
    assert d.decode_candidates[0].node_id == "d1"
    # both halves are in flight; the prefill half is released first
    assert core.tracker.inflight("p0") == 1 and core.tracker.inflight("d1") == 1
    assert core.complete_prefill("r1") and core.tracker.inflight("p0") == 0
    assert core.tracker.inflight("d1") == 1
    assert core.complete("r1", cached_tokens=6 * BS) and core.tracker.inflight("d1") == 0
    assert not core.complete("r1")
    assert core.decode.pairs == 1 and core.decode.transferred_blocks == 1


def test_aggregated_requests_use_only_both_nodes_in_a_mixed_pool() -> None:
    core, _ = _core({"p0": ("prefill", 8), "d0": ("decode", 8), "a0": ("both", 0)})
    d = core.decide_local(RouteRequest("r1", token_ids=PROMPT, disaggregated=False))
    assert d.node_id == "a0" and not d.disaggregated and d.transfer_blocks == 0
    core2, _ = _core({"p0": ("prefill", 0), "d0": ("decode", 0)})
    with pytest.raises(FailedPrecondition, match="aggregated"):
        core2.decide_local(RouteRequest("r1", token_ids=PROMPT, disaggregated=False))


def test_a_both_node_can_serve_the_whole_pair_without_a_transfer() -> None:
    core, _ = _core({"a0": ("both", 8), "a1": ("both", 0)})
    d = core.decide_local(RouteRequest("r1", token_ids=PROMPT, disaggregated=True))
    assert (d.node_id, d.decode_node_id, d.transfer_blocks) == ("a0", "a0", 0)
    assert "same node" in d.decode_reason
    assert core.tracker.inflight("a0") == 1  # one entry, not two
    assert core.complete("r1")


def test_missing_half_unknown_decode_policy_and_baselines() -> None:
    core, src = _core({"p0": ("prefill", 0)})
    with pytest.raises(Unavailable, match="decode-capable"):
        core.decide_local(RouteRequest("r1", token_ids=PROMPT, disaggregated=True))
    src.add("d0")
    src.nodes["d0"].role = "decode"
    src.add("d1", HASHES)
    src.nodes["d1"].role = "decode"
    with pytest.raises(InvalidArgument, match="decode_policy"):
        core.decide_local(RouteRequest("r2", token_ids=PROMPT, decode_policy="nope"))
    # round_robin alternates regardless of what the nodes hold
    got = [core.decide_local(RouteRequest(f"rr{i}", token_ids=PROMPT,
                                          decode_policy="round_robin")).decode_node_id
           for i in range(4)]
    assert got in (["d0", "d1", "d0", "d1"], ["d1", "d0", "d1", "d0"])
    # least_loaded goes by load alone: free got[0]'s two requests, then it is the idle one
    core.complete("rr0")
    core.complete("rr2")
    for first in ("d0", "d1"):
        src.blocks[first] = set(HASHES)  # holding everything does not matter to least_loaded
    ll = core.decide_local(RouteRequest("ll", token_ids=PROMPT, decode_policy="least_loaded"))
    assert ll.decode_node_id == got[0]


def test_decode_load_cap_and_headroom_move_the_decode_node() -> None:
    core, src = _core({"p0": ("prefill", 0), "d0": ("decode", 0), "d1": ("decode", 8)},
                      DisaggSettings(pd_load_cap_slack=0.0, pd_load_cap_factor=1.0))
    first = core.decide_local(RouteRequest("r0", token_ids=PROMPT))
    assert first.decode_node_id == "d1"
    # d1 is now ahead of the pool's mean: the cap sends the next pair to d0
    assert core.decide_local(RouteRequest("r1", token_ids=PROMPT)).decode_node_id == "d0"
    core.complete("r0")
    core.complete("r1")
    src.nodes["d1"].capacity_blocks = 100
    src.nodes["d1"].used_blocks = 100  # full: nothing new fits
    d = core.decide_local(RouteRequest("r2", token_ids=PROMPT, max_output_tokens=10 * BS))
    assert d.decode_node_id == "d0"


def test_a_follow_up_in_prefill_follows_the_blocks_still_on_their_way() -> None:
    """Turn 2 arrives while turn 1 is still prefilling: turn 1's blocks are not on its decode
    node yet (nor in the registry), but they are on their way there."""
    core, src = _core({"p0": ("prefill", 0), "d0": ("decode", 0), "d1": ("decode", 0)})
    first = core.decide_local(RouteRequest("t1", token_ids=PROMPT[:6 * BS]))
    target = first.decode_node_id
    assert core.decode.in_transit.depth(target, HASHES) == 6
    src.nodes[target].queue_depth = 2  # busier than the other one: load alone would leave it
    second = core.decide_local(RouteRequest("t2", token_ids=PROMPT))
    assert second.decode_node_id == target
    assert second.decode_matched_blocks == 6 and second.transfer_blocks == 2
    assert "holds 6 blocks" in second.decode_reason
    # once handed over, the node reports them itself; the router forgets the transit
    core.complete_prefill("t1")
    core.complete("t2")
    assert core.decode.in_transit.depth(target, HASHES) == 0 and len(core.decode.in_transit) == 0
    off, src2 = _core({"p0": ("prefill", 0), "d0": ("decode", 0), "d1": ("decode", 0)},
                      DisaggSettings(pd_count_in_transit=False))
    t1 = off.decide_local(RouteRequest("t1", token_ids=PROMPT[:6 * BS])).decode_node_id
    src2.nodes[t1].queue_depth = 2
    assert off.decide_local(RouteRequest("t2", token_ids=PROMPT)).decode_node_id != t1


def test_the_pair_is_searched_jointly_when_a_prefill_candidate_can_decode_itself() -> None:
    """p0 holds one block more than the both-node a0 (a slightly better prefill), but a0
    prefilling and decoding itself moves nothing where p0's pair would move 5 blocks."""
    roles = {"p0": ("prefill", 4), "a0": ("both", 3), "d0": ("decode", 0)}
    costly = DisaggSettings(pd_transfer_s_per_block=0.01)
    core, _ = _core(roles, costly)
    d = core.decide_local(RouteRequest("r1", token_ids=PROMPT, disaggregated=True))
    assert (d.node_id, d.decode_node_id, d.transfer_blocks) == ("a0", "a0", 0)
    assert "pair searched jointly" in d.reason and "over p0 + a0" in d.reason
    assert core.tracker.inflight("a0") == 1 and core.complete("r1")
    off, _ = _core(roles, DisaggSettings(pd_transfer_s_per_block=0.01, pd_joint_pairs=False))
    d = off.decide_local(RouteRequest("r1", token_ids=PROMPT, disaggregated=True))
    assert (d.node_id, d.decode_node_id, d.transfer_blocks) == ("p0", "a0", 5)
    # cheap transfers: the better prefill wins and the pair moves the blocks
    cheap, _ = _core(roles, DisaggSettings(pd_transfer_s_per_block=0.0001))
    d = cheap.decide_local(RouteRequest("r1", token_ids=PROMPT, disaggregated=True))
    assert d.node_id == "p0" and "jointly" not in d.reason


def test_in_transit_is_bounded_and_counts_shared_blocks_per_pair() -> None:
    from router_service.disagg import InTransit

    t = InTransit(max_pairs=2)
    t.add("a", "d0", HASHES[:4])
    t.add("b", "d0", HASHES[:2])
    t.release("a")
    assert t.depth("d0", HASHES) == 2  # b still carries the first two
    t.add("c", "d1", HASHES)
    t.add("e", "d1", HASHES[:1])  # over the bound: the oldest pair (b) is forgotten
    assert len(t) == 2 and t.depth("d0", HASHES) == 0 and t.depth("d1", HASHES) == 8
    t.release("unknown")


async def test_route_response_carries_the_pair_over_grpc() -> None:
    core, _ = _core({"p0": ("prefill", 6), "d0": ("decode", 3)})
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            r = await stub.Route(router_pb2.RouteRequest(request_id="g1", token_ids=PROMPT))
            assert (r.node_id, r.decode_node_id, r.decode_address) == ("p0", "d0", "d0:8000")
            assert r.decode_matched_blocks == 3 and r.transfer_blocks == 5 and r.decode_reason
            with pytest.raises(grpc.aio.AioRpcError) as err:  # no 'both' node to use
                await stub.Route(router_pb2.RouteRequest(
                    request_id="g2", token_ids=PROMPT, disaggregated=False))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "aggregated" in (err.value.details() or "")
            # the prefill half is released on its own (prefill_only), then the decode half
            assert core.tracker.inflight("p0") == 1 and core.tracker.inflight("d0") == 1
            half = await stub.Complete(router_pb2.CompleteRequest(
                request_id="g1", success=True, prefill_only=True))
            assert half.released and core.tracker.inflight("p0") == 0
            assert core.tracker.inflight("d0") == 1
            whole = await stub.Complete(router_pb2.CompleteRequest(request_id="g1"))
            assert whole.released and core.tracker.inflight("d0") == 0
        # the same through kvroute.client
        from kvroute.client.options import ClientOptions
        from kvroute.client.router import AsyncRouterClient

        async with AsyncRouterClient(ClientOptions(targets=[f"127.0.0.1:{port}"])) as c:
            await c.route("g3", token_ids=PROMPT)
            assert await c.complete("g3", prefill_only=True)
            assert core.tracker.inflight("p0") == 0 and core.tracker.inflight("d0") == 1
            assert await c.complete("g3") and core.tracker.inflight("d0") == 0
    finally:
        await server.stop(None)
