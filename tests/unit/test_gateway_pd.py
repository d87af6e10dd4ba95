"""The gateway's disaggregated forwarder (router_service/gateway/pd.py) against scripted engines:
what each half receives in each protocol, and which node a failure is blamed on. The full path
(real gateway, agents, registry, engine_sim) is tests/integration/test_gateway_pd.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest

from router_service.domain import RouteDecision
from router_service.gateway.pd import EngineAnswer, NodeFailed, PdForwarder
from router_service.gateway.upstream import ConnectFailed, Target


class FakeResponse:
    def __init__(self, status: int, body: dict[str, Any] | None = None,
                 delay_s: float = 0.0, head_delay_s: float = 0.0) -> None:
        self.status = status
        self.head_delay_s = head_delay_s
        self.content_type = "application/json"
        self.body = json.dumps(body or {}).encode()
        self.delay_s = delay_s
        self.released = self.closed = False

    async def read(self) -> bytes:
        await asyncio.sleep(self.delay_s)
        return self.body

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


class Engines:
    """``post`` answering per port: a FakeResponse, or an exception to raise."""

    def __init__(self, answers: dict[int, Any]) -> None:
        self.answers = answers
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.prefill_done: list[str] = []

    async def post(self, target: Target, path: str, headers: Mapping[str, str],
                   body: bytes) -> Any:
        self.sent.append((target.port, json.loads(body)))
        answer = self.answers[target.port]
        if isinstance(answer, BaseException):
            raise answer
        await asyncio.sleep(answer.head_delay_s)
        return answer

    def complete_prefill(self, request_id: str) -> bool:
        self.prefill_done.append(request_id)
        return True


DECISION = RouteDecision(
    request_id="r1", node_id="p0", address="http://127.0.0.1:8001", policy="kv_aware",
    matched_blocks=0, expected_cached_tokens=0, reason="", degraded=False, prompt_tokens=40,
    block_size=16, decode_node_id="d0", decode_address="http://127.0.0.1:8002")
BODY = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 9, "stream": True,
        "stream_options": {"include_usage": True}}


def _forwarder(engines: Engines, protocol: str, bootstrap_port: int = 0) -> PdForwarder:
    return PdForwarder(engines, engines.post, lambda a: Target.parse(a, False), protocol,
                       bootstrap_port)


def _attempt(fw: PdForwarder, last: bool = False) -> Any:
    return asyncio.run(fw.attempt(DECISION, "/v1/completions", dict(BODY), {}, last))


def test_vllm_prefill_then_decode_with_its_kv_transfer_params() -> None:
    kvt = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [0, 1]}
    decode = FakeResponse(200)
    engines = Engines({8001: FakeResponse(200, {"kv_transfer_params": kvt, "usage": {
        "prompt_tokens_details": {"cached_tokens": 32}}}), 8002: decode})
    result = _attempt(_forwarder(engines, "vllm"))
    assert result.response is decode
    (p_port, pre), (d_port, dec) = engines.sent
    assert (p_port, d_port) == (8001, 8002)
    assert pre["kv_transfer_params"]["do_remote_decode"] is True
    assert (pre["max_tokens"], pre["stream"], "stream_options" in pre) == (1, False, False)
    assert dec == {**BODY, "kv_transfer_params": kvt}  # the client's body + the hand-over
    assert engines.prefill_done == ["r1"] and result.prefill_cached == 32


@pytest.mark.parametrize(("answer", "error", "node"), [
    (FakeResponse(503), NodeFailed, "p0"),
    (ConnectFailed("refused"), NodeFailed, "p0"),
    (FakeResponse(200, {"choices": []}), NodeFailed, "p0"),  # no kv_transfer_params
    (FakeResponse(400, {"error": "bad"}), EngineAnswer, None),
])
def test_vllm_prefill_failures(answer: Any, error: type[Exception], node: str | None) -> None:
    engines = Engines({8001: answer, 8002: FakeResponse(200)})
    with pytest.raises(error) as exc:
        _attempt(_forwarder(engines, "vllm"))
    if isinstance(exc.value, NodeFailed):
        assert exc.value.node_id == node
    assert [port for port, _ in engines.sent] == [8001]  # the decode node was never called


def test_vllm_decode_5xx_blamed_on_decode_unless_last() -> None:
    ok = FakeResponse(200, {"kv_transfer_params": {"do_remote_prefill": True}})
    engines = Engines({8001: ok, 8002: FakeResponse(500)})
    with pytest.raises(NodeFailed) as exc:
        _attempt(_forwarder(engines, "vllm"))
    assert exc.value.node_id == "d0"
    engines = Engines({8001: ok, 8002: FakeResponse(500)})
    assert _attempt(_forwarder(engines, "vllm"), last=True).response.status == 500  # relayed


def test_sglang_same_body_with_bootstrap_fields_to_both() -> None:
    decode = FakeResponse(200)
    engines = Engines({8001: FakeResponse(200, {"meta_info": {"cached_tokens": 16}}),
                       8002: decode})
    result = _attempt(_forwarder(engines, "sglang"))
    assert result.response is decode
    bodies = dict(engines.sent)
    assert bodies[8001] == bodies[8002]
    sent = bodies[8001]
    assert (sent["bootstrap_host"], sent["bootstrap_port"]) == ("127.0.0.1", 8001)
    assert 0 <= sent["bootstrap_room"] < 2**63 and sent["max_tokens"] == 9
    assert engines.prefill_done == ["r1"] and result.prefill_cached == 16
    engines = Engines({8001: FakeResponse(200), 8002: FakeResponse(200)})
    asyncio.run(_forwarder(engines, "sglang", 8998).attempt(DECISION, "/generate", {}, {},
                                                             False))
    assert engines.sent[0][1]["bootstrap_port"] == 8998


def test_sglang_prefill_answering_after_the_decode_head_reports_its_cached_tokens() -> None:
    """The prefill's answer may come after the decode's head: the attempt's result gets its
    cached tokens (and the core its prefill release) when it is in."""
    engines = Engines({8001: FakeResponse(200, {"meta_info": {"cached_tokens": 48}},
                                          delay_s=0.05), 8002: FakeResponse(200)})
    fw = _forwarder(engines, "sglang")

    async def run() -> tuple[int | None, int | None, list[str]]:
        result = await fw.attempt(DECISION, "/generate", dict(BODY), {}, False)
        at_head, released_at_head = result.prefill_cached, list(engines.prefill_done)
        for _ in range(100):
            if result.prefill_cached is not None:
                break
            await asyncio.sleep(0.01)
        return at_head, result.prefill_cached, released_at_head

    at_head, later, released_at_head = asyncio.run(run())
    assert (at_head, released_at_head) == (None, [])
    assert later == 48 and engines.prefill_done == ["r1"]


def test_sglang_complete_waits_for_a_prefill_answering_after_the_decode_ended() -> None:
    """The decode may have ended (the proxy's Complete is due) before the prefill answers:
    the Complete's cached tokens are the prefill's, reported when its answer is in."""
    engines = Engines({8001: FakeResponse(200, {"meta_info": {"cached_tokens": 48}},
                                          delay_s=0.1), 8002: FakeResponse(200)})
    fw = _forwarder(engines, "sglang")

    async def run() -> tuple[list[int | None], list[int | None]]:
        result = await fw.attempt(DECISION, "/generate", dict(BODY), {}, False)
        assert result.prefill_pending
        completes: list[int | None] = []
        result.when_prefilled(completes.append, grace_s=5.0)  # the decode's end
        at_decode_end = list(completes)
        for _ in range(200):
            if completes:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return at_decode_end, completes

    at_decode_end, completes = asyncio.run(run())
    assert at_decode_end == [] and completes == [48]  # once, with the prefill's figure
    assert engines.prefill_done == ["r1"]


def test_sglang_complete_waits_a_bounded_time_for_a_silent_prefill() -> None:
    engines = Engines({8001: FakeResponse(200, {"meta_info": {"cached_tokens": 48}},
                                          delay_s=0.5), 8002: FakeResponse(200)})
    fw = _forwarder(engines, "sglang")

    async def run() -> tuple[list[int | None], list[int | None], int | None]:
        result = await fw.attempt(DECISION, "/generate", dict(BODY), {}, False)
        completes: list[int | None] = []
        result.when_prefilled(completes.append, grace_s=0.05)
        await asyncio.sleep(0.3)
        at_grace = list(completes)
        for _ in range(200):  # the late answer still releases the prefill half, once
            if engines.prefill_done:
                break
            await asyncio.sleep(0.01)
        return at_grace, completes, result.prefill_cached

    at_grace, completes, late = asyncio.run(run())
    assert at_grace == [None] and completes == [None]
    assert late == 48 and engines.prefill_done == ["r1"]


def test_complete_is_not_deferred_when_the_prefill_answered_first() -> None:
    engines = Engines({8001: FakeResponse(200, {"meta_info": {"cached_tokens": 32}}),
                       8002: FakeResponse(200, head_delay_s=0.1)})
    fw = _forwarder(engines, "sglang")

    async def run() -> list[int | None]:
        result = await fw.attempt(DECISION, "/generate", dict(BODY), {}, False)
        completes: list[int | None] = []
        result.when_prefilled(completes.append, grace_s=5.0)
        return completes

    assert asyncio.run(run()) == [32]
    vllm = Engines({8001: FakeResponse(200, {"kv_transfer_params": {"x": 1},
                                             "usage": {"prompt_tokens_details":
                                                       {"cached_tokens": 16}}}),
                    8002: FakeResponse(200)})
    got: list[int | None] = []
    _attempt(_forwarder(vllm, "vllm")).when_prefilled(got.append)
    assert got == [16]


def test_sglang_decode_failing_because_its_prefill_failed_blames_the_prefill() -> None:
    engines = Engines({8001: ConnectFailed("refused"), 8002: FakeResponse(503)})
    with pytest.raises(NodeFailed) as exc:
        _attempt(_forwarder(engines, "sglang"), last=True)
    assert exc.value.node_id == "p0"
    # the prefill answered; the decode node itself is down
    engines = Engines({8001: FakeResponse(200, delay_s=0.05), 8002: ConnectFailed("down")})
    with pytest.raises(NodeFailed) as exc:
        _attempt(_forwarder(engines, "sglang"))
    assert exc.value.node_id == "d0"
    # a 4xx from the prefill is the client's answer; the decode connection is closed
    decode = FakeResponse(200, head_delay_s=0.05)
    engines = Engines({8001: FakeResponse(400, {"error": "bad"}), 8002: decode})
    with pytest.raises(EngineAnswer):
        _attempt(_forwarder(engines, "sglang"))
    assert [port for port, _ in engines.sent] == [8001, 8002]


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(ValueError, match="pd_protocol"):
        _forwarder(Engines({}), "mooncake")


def test_a_pair_on_one_both_node_is_served_whole() -> None:
    """The core may give both halves to one ``both`` node: the gateway then forwards the
    request whole and reads its cached tokens from the answer, as for an aggregated one."""
    assert DECISION.disaggregated and DECISION.split
    same = dataclasses.replace(DECISION, decode_node_id="p0", decode_address=DECISION.address)
    assert same.disaggregated and not same.split
    assert not dataclasses.replace(DECISION, decode_node_id="", decode_address="").split
