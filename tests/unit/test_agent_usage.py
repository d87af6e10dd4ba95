"""Usage from a vLLM-style Prometheus endpoint (a real aiohttp server on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from kvroute.procs import free_port
from node_agent.usage import UsageProbe, parse_engine_metrics

VLLM_METRICS = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",cache_dtype="auto",num_gpu_blocks="1000",\
num_cpu_blocks="None",enable_prefix_caching="True"} 1.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
"""


def test_parse_vllm_metrics() -> None:
    m = parse_engine_metrics(VLLM_METRICS)
    assert (m.usage_frac, m.running, m.waiting) == (0.5, 5, 7)
    assert (m.num_gpu_blocks, m.engine_block_size) == (1000, 32)
    empty = parse_engine_metrics("")
    assert empty.usage_frac is None and empty.num_gpu_blocks is None


@pytest.fixture
async def engine_metrics() -> AsyncIterator[str]:
    async def handler(_req: web.Request) -> web.Response:
        return web.Response(text=VLLM_METRICS, content_type="text/plain")
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/metrics"
    await runner.cleanup()


async def test_probe_reads_capacity_and_usage(engine_metrics: str) -> None:
    probe = UsageProbe(engine_metrics, lambda: 42)
    try:
        # 1000 engine blocks of 32 tokens = 2000 kvroute blocks of 16
        assert await probe.discover_capacity(16) == 2000
        probe.capacity_blocks = 2000
        u = await probe.read()
        assert (u.used_blocks, u.queue_depth, u.running, u.from_engine) == (1000, 7, 5, True)
    finally:
        await probe.close()


async def test_probe_falls_back_to_event_counts() -> None:
    probe = UsageProbe(f"http://127.0.0.1:{free_port()}/metrics", lambda: 42, timeout_s=0.5)
    try:
        u = await probe.read()
        assert (u.used_blocks, u.queue_depth, u.from_engine) == (42, 0, False)
        assert probe.scrape_errors == 1
        assert await UsageProbe("", lambda: 1).discover_capacity(16) == 0
    finally:
        await probe.close()


def _prefill_page(prefill_s: float, prompt: int, hits: int, computed: int | None = None) -> str:
    kv = "" if computed is None else (
        "# TYPE vllm:request_prefill_kv_computed_tokens histogram\n"
        'vllm:request_prefill_kv_computed_tokens_bucket{engine="0",le="+Inf"} 10.0\n'
        'vllm:request_prefill_kv_computed_tokens_count{engine="0"} 10.0\n'
        f'vllm:request_prefill_kv_computed_tokens_sum{{engine="0"}} {computed}\n')
    return (VLLM_METRICS + kv
            + "# TYPE vllm:request_prefill_time_seconds histogram\n"
            + 'vllm:request_prefill_time_seconds_bucket{engine="0",le="+Inf"} 10.0\n'
            + 'vllm:request_prefill_time_seconds_count{engine="0"} 10.0\n'
            + f'vllm:request_prefill_time_seconds_sum{{engine="0"}} {prefill_s}\n'
            + "# TYPE vllm:prompt_tokens counter\n"
            + f'vllm:prompt_tokens_total{{engine="0"}} {prompt}\n'
            + "# TYPE vllm:prefix_cache_hits counter\n"
            + f'vllm:prefix_cache_hits_total{{engine="0"}} {hits}\n')


async def _serve_pages(pages: list[str]) -> tuple[web.AppRunner, str]:
    """A /metrics endpoint answering ``pages`` in turn (the last one from then on)."""
    async def handler(_req: web.Request) -> web.Response:
        return web.Response(text=pages.pop(0) if len(pages) > 1 else pages[0],
                            content_type="text/plain")
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/metrics"


@pytest.mark.parametrize("with_computed", [True, False])
async def test_probe_measures_the_engine_s_prefill_rate(with_computed: bool) -> None:
    """vLLM's per-request computed-token histogram moves with the prefill time: any window is
    exact. Without it (older vLLM) the prompt - hit counters lead the prefill time, so windows
    hold >= 10 s of prefill (a 2-s window is not closed yet)."""
    # the computed-token sum disagrees with prompt - hits on purpose: it must win
    runner, url = await _serve_pages([
        _prefill_page(0.0, 0, 0, 0 if with_computed else None),
        _prefill_page(2.0, 9000, 1000, 6000 if with_computed else None),
        _prefill_page(12.0, 49000, 1000, 36000 if with_computed else None)])
    probe = UsageProbe(url, lambda: 0)
    try:
        assert (await probe.read()).prefill_tokens_per_s == 0.0  # baseline scrape
        second = (await probe.read()).prefill_tokens_per_s
        third = (await probe.read()).prefill_tokens_per_s
        if with_computed:  # 6000 computed tokens in 2 s of prefill, then 30000 in 10 s
            assert (second, third) == (pytest.approx(3000.0), pytest.approx(3000.0))
        else:  # one 12-s window: (49000 prompt - 1000 cached) tokens
            assert (second, third) == (0.0, pytest.approx(4000.0))
        m = parse_engine_metrics(_prefill_page(4.0, 18000, 2000, 7))
        assert (m.prefill_seconds, m.prompt_tokens, m.cache_hit_tokens,
                m.kv_computed_tokens) == (4.0, 18000, 2000, 7)
    finally:
        await probe.close()
        await runner.cleanup()


async def test_a_decode_node_s_agent_reports_no_prefill_rate() -> None:
    """--role decode: what a decode engine's prefill metrics hold (one step per received
    request on vLLM) is not a prefill rate; the agent reports none (0 = not measured)."""
    runner, url = await _serve_pages([_prefill_page(0.0, 0, 0, 0),
                                      _prefill_page(2.0, 9000, 1000, 6000)])
    probe = UsageProbe(url, lambda: 0, learn_prefill_rate=False)
    try:
        first, second = await probe.read(), await probe.read()
        assert (first.prefill_tokens_per_s, second.prefill_tokens_per_s) == (0.0, 0.0)
        assert second.from_engine and probe.prefill_rate.windows == 0
    finally:
        await probe.close()
        await runner.cleanup()
