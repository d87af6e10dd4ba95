"""The Router servicer over a real in-process gRPC server, with an in-memory placement source.

The registry link is replaced by :class:`MemorySource` (a PlacementSource holding nodes and
blocks), so validation, policy dispatch, degradation and streams are checked without a registry;
the integration tests run the same paths against real registry processes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.blocks import hash_blocks
from kvroute.errors import KvrouteError, Unavailable
from kvroute.v1 import router_pb2, router_pb2_grpc
from router_service.core import RouterCore
from router_service.load import LoadTracker
from router_service.placement import NodeState, Placement
from router_service.policies.factory import PolicySet
from router_service.proto_adapter import to_route_request
from router_service.servicer import RouterServicer
from router_service.settings import RouterSettings
from router_service.tokenizer import load_tokenizer

BS = 16


class MemorySource:
    mode = "memory"
    local = True

    def __init__(self) -> None:
        self.nodes: dict[str, NodeState] = {}
        self.blocks: dict[str, set[int]] = {}
        self.up = True
        self.block_size = BS
        self.departed: Callable[[str], None] = lambda nid: None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    @property
    def connected(self) -> bool:
        return self.up

    def staleness_s(self) -> float:
        return 0.0

    def registry_block_size(self) -> int:
        return self.block_size

    async def lookup(self, block_hashes: Sequence[int], model: str) -> Placement:
        return self.lookup_local(block_hashes, model)

    def lookup_local(self, block_hashes: Sequence[int], model: str) -> Placement:
        if not self.up:
            raise Unavailable("registry down (test)")
        out = []
        for nid, n in self.nodes.items():
            if n.model != model:
                continue
            m = 0
            while m < len(block_hashes) and block_hashes[m] in self.blocks[nid]:
                m += 1
            out.append((n, m))
        return Placement(out, BS)

    def last_known(self) -> list[NodeState]:
        return list(self.nodes.values())

    def nodes_known(self) -> int:
        return len(self.nodes)

    def on_departure(self, hook: Callable[[str], None]) -> None:
        self.departed = hook

    def remove(self, nid: str) -> None:
        del self.nodes[nid], self.blocks[nid]
        self.departed(nid)

    def add(self, nid: str, blocks: Sequence[int] = (), model: str = "m") -> None:
        self.nodes[nid] = NodeState(nid, f"{nid}:8000", model)
        self.blocks[nid] = set(blocks)


@pytest.fixture
async def router() -> AsyncIterator[tuple[router_pb2_grpc.RouterStub, MemorySource, int]]:
    src = MemorySource()
    settings = RouterSettings(registry="127.0.0.1:1", max_prompt_tokens=1000,
                              max_token_id=50_000, max_prompt_chars=5000)
    core = RouterCore(settings, PolicySet(), src, LoadTracker(lambda: 0.0),
                      load_tokenizer("simple"))
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield router_pb2_grpc.RouterStub(channel), src, port
    finally:
        await channel.close(None)
        await server.stop(None)


PROMPT = list(range(100, 100 + 8 * BS))
HASHES = hash_blocks(PROMPT, BS)


async def test_route_prefers_longest_prefix_and_explains(router: tuple) -> None:  # type: ignore[type-arg]
    stub, src, _ = router
    src.add("a", HASHES[:2])
    src.add("b", HASHES[:6])
    src.add("c")
    resp = await stub.Route(router_pb2.RouteRequest(request_id="r1", token_ids=PROMPT))
    assert resp.node_id == "b" and resp.address == "b:8000" and resp.policy == "kv_aware"
    assert resp.matched_blocks == 6 and resp.expected_cached_tokens == 6 * BS
    assert resp.prompt_tokens == len(PROMPT) and not resp.degraded
    assert "6 prefix blocks cached" in resp.reason and len(resp.candidates) == 3
    ll = await stub.Route(router_pb2.RouteRequest(request_id="r2", token_ids=PROMPT,
                                                  policy="least_loaded"))
    assert ll.policy == "least_loaded" and ll.node_id in ("a", "c")
    stats = await stub.Stats(router_pb2.StatsRequest())
    assert stats.decisions_by_policy == {"kv_aware": 1, "least_loaded": 1}
    assert stats.inflight_by_node["b"] == 1
    assert (await stub.Complete(router_pb2.CompleteRequest(request_id="r1", success=True,
                                                           cached_tokens=96))).released
    assert not (await stub.Complete(router_pb2.CompleteRequest(request_id="r1"))).released
    stats = await stub.Stats(router_pb2.StatsRequest())
    assert "b" not in stats.inflight_by_node and stats.reported_cached_tokens == 96


@pytest.mark.parametrize(("req", "code", "text"), [
    (router_pb2.RouteRequest(request_id="x"), "INVALID_ARGUMENT", "token_ids"),
    (router_pb2.RouteRequest(token_ids=[1]), "INVALID_ARGUMENT", "request_id"),
    (router_pb2.RouteRequest(request_id="x", token_ids=[1] * 1001), "INVALID_ARGUMENT",
     "limit of 1000"),
    (router_pb2.RouteRequest(request_id="x", token_ids=[1, 70_000]), "INVALID_ARGUMENT",
     "out of range 0..50000"),
    (router_pb2.RouteRequest(request_id="x", prompt="w " * 3000), "INVALID_ARGUMENT",
     "limit of 5000"),
    (router_pb2.RouteRequest(request_id="x", token_ids=[1], policy="nope"),
     "INVALID_ARGUMENT", "policy: unknown policy 'nope'"),
    (router_pb2.RouteRequest(request_id="x", token_ids=[1], model="gpt-9"), "NOT_FOUND",
     "model: no node serves model 'gpt-9'"),
    (router_pb2.RouteRequest(request_id="x", block_hashes=[1, 2], num_prompt_tokens=3),
     "INVALID_ARGUMENT", "num_prompt_tokens"),
    (router_pb2.RouteRequest(request_id="x" * 300, token_ids=[1]), "INVALID_ARGUMENT",
     "1-256"),
])
async def test_bad_input_gets_the_right_status_naming_the_field(
        router: tuple, req: router_pb2.RouteRequest, code: str, text: str) -> None:  # type: ignore[type-arg]
    stub, src, _ = router
    src.add("a")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Route(req)
    assert info.value.code().name == code
    assert text in (info.value.details() or "")


async def test_registry_down_degrades_then_unavailable_without_nodes(router: tuple) -> None:  # type: ignore[type-arg]
    stub, src, _ = router
    src.add("a", HASHES)
    src.add("b")
    src.up = False
    r = await stub.Route(router_pb2.RouteRequest(request_id="d1", token_ids=PROMPT))
    assert r.degraded and r.policy == "least_loaded" and "DEGRADED" in r.reason
    r2 = await stub.Route(router_pb2.RouteRequest(request_id="d2", token_ids=PROMPT))
    assert {r.node_id, r2.node_id} == {"a", "b"}
    assert (await stub.Stats(router_pb2.StatsRequest())).degraded_decisions == 2
    src.nodes.clear()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Route(router_pb2.RouteRequest(request_id="d3", token_ids=PROMPT))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_block_size_mismatch_is_failed_precondition(router: tuple) -> None:  # type: ignore[type-arg]
    stub, src, _ = router
    src.add("a")
    src.block_size = 32
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Route(router_pb2.RouteRequest(request_id="x", token_ids=PROMPT))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--block-size 32" in (info.value.details() or "")


async def test_route_stream_answers_in_order_with_per_message_errors(router: tuple) -> None:  # type: ignore[type-arg]
    stub, src, _ = router
    src.add("a", HASHES[:3])
    src.add("b")

    async def reqs() -> AsyncIterator[router_pb2.RouteRequest]:
        yield router_pb2.RouteRequest(request_id="s1", token_ids=PROMPT)
        yield router_pb2.RouteRequest(request_id="s2")
        yield router_pb2.RouteRequest(request_id="s3", prompt="hello there", session_id="u1",
                                      policy="session")

    out = [r async for r in stub.RouteStream(reqs())]
    assert [r.request_id for r in out] == ["s1", "s2", "s3"]
    assert out[0].node_id == "a" and not out[0].HasField("error")
    assert out[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert out[2].policy == "session" and out[2].prompt_tokens == 2


@settings(max_examples=150, deadline=None)
@given(rid=st.text(max_size=300), tokens=st.lists(st.integers(0, 2**32 - 1), max_size=1200),
       prompt=st.text(max_size=200), hashes=st.lists(st.integers(0, 2**64 - 1), max_size=80),
       n_prompt=st.integers(0, 2**32 - 1), policy=st.none() | st.text(max_size=20),
       model=st.sampled_from(["", "m", "x" * 300, "other"]),
       session=st.none() | st.text(max_size=300))
def test_nothing_a_client_sends_crashes_the_core(
        rid: str, tokens: list[int], prompt: str, hashes: list[int], n_prompt: int,
        policy: str | None, model: str, session: str | None) -> None:
    src = MemorySource()
    src.add("a", HASHES[:2])
    src.add("b")
    core = RouterCore(RouterSettings(registry="127.0.0.1:1", max_prompt_tokens=1000,
                                     max_token_id=50_000), PolicySet(), src,
                      LoadTracker(lambda: 0.0), load_tokenizer("simple"))
    req = router_pb2.RouteRequest(request_id=rid, token_ids=tokens, prompt=prompt,
                                  block_hashes=hashes, num_prompt_tokens=n_prompt, model=model)
    if policy is not None:
        req.policy = policy
    if session is not None:
        req.session_id = session
    try:
        resp = asyncio.run(core.decide(to_route_request(req)))
    except KvrouteError:
        return
    assert resp.node_id in ("a", "b")


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "route", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_route_cli_inputs_and_errors(router: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    _, src, port = router
    src.add("a", HASHES[:4])
    src.add("b")
    target = f"127.0.0.1:{port}"
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps(PROMPT))
    rc, out, _ = await _cli("--router", target, "--tokens-file", str(f), "--json")
    assert rc == 0 and json.loads(out)["node_id"] == "a"
    rc, out, _ = await _cli("--router", target, "--prompt", "hello world", "--session", "s1",
                            "--policy", "session")
    assert rc == 0 and "policy:   session" in out and "reason:" in out
    rc, _, err = await _cli("--router", target, "--tokens", "1,2", "--policy", "nope")
    assert rc == 1 and "INVALID_ARGUMENT" in err and "unknown policy" in err


async def test_lora_and_cache_salt_match_only_blocks_cached_under_them(
        router: tuple) -> None:  # type: ignore[type-arg]
    """The router salts block 0 exactly as the node agent does for the engine's events."""
    from node_agent.block_map import BlockMap
    from node_agent.deltas import DeltaLog
    from node_agent.events import Stored

    stub, src, _ = router
    agent_map = BlockMap(BS, DeltaLog())
    agent_map.apply(Stored(tuple(range(1, 9)), None, tuple(PROMPT), BS, lora_name="adapter-a",
                           cache_salt="tenant-1"))
    src.add("lora-node", agent_map.canonical_hashes())
    src.add("base-node", HASHES)
    base = await stub.Route(router_pb2.RouteRequest(request_id="s1", token_ids=PROMPT))
    salted = await stub.Route(router_pb2.RouteRequest(
        request_id="s2", token_ids=PROMPT, lora_name="adapter-a", cache_salt="tenant-1"))
    other = await stub.Route(router_pb2.RouteRequest(
        request_id="s3", token_ids=PROMPT, lora_name="adapter-b"))
    # 8 blocks cached, 7 reusable: the engine recomputes the prompt's last token
    assert (base.node_id, base.matched_blocks) == ("base-node", 7)
    assert (salted.node_id, salted.matched_blocks) == ("lora-node", 7)
    assert other.matched_blocks == 0
