"""SimEngine on its scaled clock: admission, waiting on model times, abort, stats records."""

from __future__ import annotations

import asyncio

import pytest

from engine_sim.engine import SimEngine
from engine_sim.settings import EngineSimSettings


def settings(**kw: object) -> EngineSimSettings:
    base: dict[str, object] = {"events_endpoint": "", "replay_endpoint": "", "time_scale": 0.001,
                               "capacity_blocks": 8, "block_size": 4, "max_running": 1}
    base.update(kw)
    return EngineSimSettings(**base)  # type: ignore[arg-type]


async def test_requests_run_on_the_scaled_clock_and_are_recorded() -> None:
    eng = SimEngine(settings())
    await eng.start()
    try:
        prompt = list(range(10))
        r1 = await eng.submit(eng.make_request(prompt, 3, "a"))
        await eng.sleep_until(r1.finished_at or 0.0)
        r2 = await eng.submit(eng.make_request(prompt, 3, "b"))
        assert r2.cached_tokens == 8
        await eng.sleep_until(r2.finished_at or 0.0)
        await asyncio.sleep(0.01)
        stats = eng.stats()
        assert [r["request_id"] for r in stats["records"]] == ["a", "b"]
        assert stats["cached_tokens"] == 8 and stats["prompt_tokens"] == 20
        assert eng.stats(since=1)["records"][0]["request_id"] == "b"
        assert eng.load()["num_running"] == 0
    finally:
        await eng.stop()


async def test_cancelled_waiter_aborts_and_frees_blocks() -> None:
    eng = SimEngine(settings(decode_ms_per_token=1_000_000.0))  # first request never ends
    await eng.start()
    try:
        long = await eng.submit(eng.make_request(list(range(8)), 2, "long"))
        assert eng.cache.used_blocks == 3
        waiting = asyncio.ensure_future(eng.submit(eng.make_request(list(range(50, 58)), 2)))
        await asyncio.sleep(0.01)
        assert eng.model.num_waiting == 1
        waiting.cancel()
        await asyncio.sleep(0.01)
        assert eng.model.num_waiting == 0
        eng.abort(long)
        assert eng.cache.used_blocks == 0 and eng.model.num_running == 0
        assert eng.stats()["requests_aborted"] == 2
    finally:
        await eng.stop()


async def test_prefill_time_metric_is_on_the_wall_clock() -> None:
    """A node agent derives the engine's prefill rate from vllm:request_prefill_time_seconds
    for a router on the wall clock: the histogram reports model seconds x time_scale, so at
    time_scale 0.001 a 1,000 tokens/s engine prefills 1 M/s."""
    from prometheus_client import generate_latest

    from engine_sim.metrics import make_registry
    from node_agent.usage import parse_engine_metrics

    eng = SimEngine(settings(prefill_tokens_per_s=1000.0, capacity_blocks=64))
    await eng.start()
    try:
        r = await eng.submit(eng.make_request(list(range(200)), 2, "a"))
        await eng.sleep_until(r.finished_at or 0.0)
        await asyncio.sleep(0.01)
        model_s = eng.model.prefill_seconds_total
        assert model_s > 0
        text = generate_latest(make_registry(eng)).decode()
        line = next(x for x in text.splitlines()
                    if x.startswith("vllm:request_prefill_time_seconds_sum"))
        wall = float(line.rsplit(" ", 1)[1])
        assert abs(wall - 200 / 1000.0 * 0.001) < 1e-9  # model 0.2 s x time_scale
        m = parse_engine_metrics(text)
        assert m.prefill_seconds is not None
        assert abs(m.prefill_seconds - model_s * 0.001) < 1e-9
    finally:
        await eng.stop()


def test_counters_move_when_vllm_moves_them_and_the_agent_reads_the_true_rate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM v1 counts prefix-cache hits when a request is scheduled, prompt tokens at its first
    token, and the per-request prefill time and computed tokens when it finishes. Driven with a
    growing queue on a virtual clock and scraped like the node agent, the computed-token
    histogram gives the true wall rate in every window; prompt - hits does not."""
    from prometheus_client import generate_latest

    from engine_sim.metrics import make_registry
    from kvroute.prefill_rate import PrefillRateEstimator
    from node_agent.usage import EngineMetrics, parse_engine_metrics

    eng = SimEngine(settings(prefill_tokens_per_s=1000.0, capacity_blocks=4000,
                             max_running=8, decode_ms_per_token=50.0, time_scale=0.5))
    clock = [0.0]
    monkeypatch.setattr(eng, "now", lambda: clock[0])

    def scrape(t: float) -> EngineMetrics:
        clock[0] = t
        eng._after(eng.model.advance(t))
        return parse_engine_metrics(generate_latest(make_registry(eng)).decode())

    shared = list(range(40))
    first = eng.make_request(shared + list(range(1000, 1100)), 20, "r0")
    eng._after(eng.model.submit(first, 0.0))
    m = scrape(0.001)  # admitted: hits/queries counted, prompt tokens not yet
    assert (m.prompt_tokens, m.prefill_seconds, m.kv_computed_tokens) == (0.0, 0.0, 0.0)
    m = scrape(0.2)  # first token at 0.14, finish at 0.14 + 19 x 0.05
    assert (m.prompt_tokens, m.prefill_seconds) == (140.0, 0.0)
    kv, old = PrefillRateEstimator(min_window_s=0.05), PrefillRateEstimator(min_window_s=0.05)
    kv_samples: list[float] = []
    old_samples: list[float] = []
    t = 0.2
    for i in range(1, 80):  # arrivals every 0.06 s, prefills of 0.1-0.14 s: the queue grows
        uniq = list(range(2000 + i * 200, 2000 + i * 200 + 60 + 40 * (i % 2)))
        req = eng.make_request(shared + uniq, 10 + 30 * (i % 3), f"r{i}")
        t += 0.06
        clock[0] = t
        eng._after(eng.model.submit(req, t))
        m = scrape(t)
        assert m.prefill_seconds is not None and m.kv_computed_tokens is not None
        assert m.prompt_tokens is not None
        before = kv.windows, old.windows
        kv.update(m.kv_computed_tokens, m.prefill_seconds)
        old.update(m.prompt_tokens - m.cache_hit_tokens, m.prefill_seconds)
        if kv.windows > before[0]:
            kv_samples.append(kv.rate)
        if old.windows > before[1]:
            old_samples.append(old.rate)
    true_wall = 1000.0 / 0.5
    assert len(kv_samples) > 5 and all(r == pytest.approx(true_wall) for r in kv_samples)
    assert max(abs(r / true_wall - 1) for r in old_samples) > 0.05
