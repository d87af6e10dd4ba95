"""engine_sim latency model: prefill ~ uncached tokens, decode per token, FIFO batch limit."""

from __future__ import annotations

import pytest

from engine_sim.cache import EngineHasher, KVCache
from engine_sim.model import EngineModel, RequestTooLarge, SimRequest
from engine_sim.params import EngineParams

BS = 16
H = EngineHasher(3)


def req(rid: str, tokens: list[int], max_tokens: int = 5) -> SimRequest:
    return SimRequest(rid, tokens, H.hash_blocks(tokens, BS), max_tokens)


def model(capacity: int = 1000, max_running: int = 4) -> EngineModel:
    return EngineModel(KVCache(capacity, BS),
                       EngineParams(prefill_tokens_per_s=1000.0, decode_s_per_token=0.01,
                                    max_running=max_running, capacity_blocks=capacity,
                                    block_size=BS))


def test_prefill_proportional_to_uncached_tokens_and_decode_per_token() -> None:
    m = model()
    prompt = list(range(200))
    r1 = req("a", prompt)
    assert m.submit(r1, 0.0).admitted == [r1]
    assert r1.first_token_at == pytest.approx(0.2)  # 200 tokens at 1000/s
    assert r1.finished_at == pytest.approx(0.2 + 4 * 0.01)
    assert m.advance(1.0).finished == [r1]
    r2 = req("b", prompt)
    m.submit(r2, 2.0)
    assert r2.cached_tokens == 192  # 12 full blocks reused
    assert r2.first_token_at == pytest.approx(2.0 + 8 / 1000)


def test_prefills_run_one_after_another() -> None:
    m = model()
    r1, r2 = req("a", list(range(100))), req("b", list(range(500, 600)))
    m.submit(r1, 0.0)
    m.submit(r2, 0.0)
    assert r2.prefill_start == pytest.approx(r1.first_token_at)
    assert m.pending_prefill_tokens(0.05) == 200


def test_fifo_queue_with_batch_limit() -> None:
    m = model(max_running=2)
    rs = [req(str(i), list(range(i * 100, i * 100 + 50)), max_tokens=10) for i in range(4)]
    for r in rs:
        m.submit(r, 0.0)
    assert m.num_running == 2 and m.num_waiting == 2
    end0 = rs[0].finished_at
    assert end0 is not None and m.next_event_time() == pytest.approx(end0)
    step = m.advance(end0)
    assert rs[0] in step.finished and rs[2] in step.admitted
    assert rs[2].admitted_at == pytest.approx(end0)
    assert rs[3].admitted_at is None  # strict FIFO order
    m.advance(100.0)
    assert m.finished_total == 4 and m.num_running == 0


def test_kv_capacity_gates_admission_and_rejects_impossible() -> None:
    m = model(capacity=10)
    big = req("big", list(range(8 * BS)), max_tokens=BS)  # 9 blocks
    m.submit(big, 0.0)
    small = req("small", list(range(1000, 1000 + 2 * BS)), max_tokens=1)  # 3 blocks
    m.submit(small, 0.0)
    assert m.num_waiting == 1  # waits until big releases its blocks
    m.advance(big.finished_at or 0.0)
    assert small.admitted_at is not None
    with pytest.raises(RequestTooLarge):
        m.submit(req("huge", list(range(11 * BS))), 5.0)


def test_abort_frees_blocks_and_admits_next() -> None:
    m = model(capacity=10, max_running=1)
    a, b = req("a", list(range(40))), req("b", list(range(100, 140)))
    m.submit(a, 0.0)
    m.submit(b, 0.0)
    assert m.abort("a", 0.01)
    assert m.cache.used_blocks == 3 and b.admitted_at == pytest.approx(0.01)
    assert m.abort("b", 0.02) and not m.abort("nope", 0.02)
    assert m.cache.used_blocks == 0 and m.next_event_time() is None


def test_a_decode_engine_receives_the_blocks_it_lacks_instead_of_prefilling() -> None:
    params = EngineParams(prefill_tokens_per_s=1000.0, decode_s_per_token=0.01, max_running=4,
                          capacity_blocks=1000, block_size=BS, role="decode",
                          transfer_s_per_block=0.001)
    cache = KVCache(1000, BS)
    m = EngineModel(cache, params)
    prompt = list(range(200))  # 12 full blocks + 8 tokens
    first = req("a", prompt)
    first.remote_kv = True
    m.submit(first, 0.0)
    assert first.cached_tokens == 0 and first.transfer_blocks == 13
    assert first.first_token_at == pytest.approx(0.013)  # transfer only, no prefill
    assert m.pending_prefill_tokens(0.0) == 0
    m.advance(1.0)
    follow = req("b", prompt + list(range(300, 340)))  # the conversation's next turn
    follow.remote_kv = True
    m.submit(follow, 2.0)
    assert follow.cached_tokens == 192  # the received blocks were stored: only the rest moves
    assert follow.transfer_blocks == 3 and follow.transfer_s == pytest.approx(0.003)
    m.advance(3.0)
    # receipts are not prefill (vLLM's decode instance: KV wait = queue time, received tokens
    # = cached): a prefill rate learned from these totals would read the transfer speed
    assert (m.prefill_seconds_total, m.prefill_computed_tokens_total) == (0.0, 0)
    assert m.kv_received_blocks_total == 16
    assert m.kv_received_seconds_total == pytest.approx(0.016)
    with pytest.raises(ValueError, match="role"):
        EngineParams(role="encoder")


def test_mixed_batch_slowdown_lengthens_a_prefill_per_decoding_request_and_defaults_off() -> None:
    def run(slowdown: float) -> list[SimRequest]:
        m = EngineModel(KVCache(1000, BS), EngineParams(
            prefill_tokens_per_s=1000.0, decode_s_per_token=0.01, max_running=8,
            capacity_blocks=1000, block_size=BS, mixed_batch_slowdown=slowdown))
        a, b = req("a", list(range(100)), 50), req("b", list(range(200, 300)), 50)
        c = req("c", list(range(400, 500)))
        m.submit(a, 0.0)
        m.submit(b, 0.0)  # a decodes while b prefills (from 0.1)
        m.submit(c, 0.5)  # a and b decode while c prefills
        return [a, b, c]

    a, b, c = run(0.0)
    assert (a.first_token_at, b.first_token_at) == (pytest.approx(0.1), pytest.approx(0.2))
    assert c.first_token_at == pytest.approx(0.6)  # today's model: decode never slows prefill
    a, b, c = run(0.5)
    assert a.first_token_at == pytest.approx(0.1)  # nothing decoding when it started
    assert b.first_token_at == pytest.approx(0.1 + 0.1 * 1.5)
    assert c.first_token_at == pytest.approx(0.5 + 0.1 * 2.0)
    with pytest.raises(ValueError, match="mixed_batch_slowdown"):
        EngineParams(mixed_batch_slowdown=-1.0)
