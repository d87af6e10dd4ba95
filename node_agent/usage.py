"""KV usage, running and waiting requests from the engine's Prometheus endpoint.

Reads vLLM's gauges ``vllm:kv_cache_usage_perc`` (fraction, 1 = full; averaged over engines),
``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` (summed), and the capacity from
``vllm:cache_config_info`` (labels ``num_gpu_blocks``, ``block_size``). Without a URL, or when
a scrape fails, usage is the count of blocks the events say the engine holds and the queue is 0.

Issue 19: the engine's prefill rate, measured from ``vllm:request_prefill_time_seconds_sum``
(seconds spent prefilling, finished requests) and the prompt tokens it computed, each summed over
engines, by a :class:`kvroute.prefill_rate.PrefillRateEstimator`; reported in every heartbeat.
The tokens are ``vllm:request_prefill_kv_computed_tokens_sum`` (observed per finished request
with its prefill time, so the two move together) when the engine exports it, else
``vllm:prompt_tokens_total`` - ``vllm:prefix_cache_hits_total`` (counted at first token and at
scheduling: they lead the prefill time, so that estimate uses longer windows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kvroute.prefill_rate import PrefillRateEstimator

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a heartbeat reports about load."""

    used_blocks: int
    queue_depth: int
    running: int
    from_engine: bool
    prefill_tokens_per_s: float = 0.0
    """Measured prefill rate (0 = not measured yet)."""


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """Values read from one scrape (None = not exported)."""

    usage_frac: float | None
    running: int | None
    waiting: int | None
    num_gpu_blocks: int | None
    engine_block_size: int | None
    prefill_seconds: float | None = None
    """``vllm:request_prefill_time_seconds_sum`` (None = not exported)."""
    prompt_tokens: float | None = None
    """``vllm:prompt_tokens_total``."""
    cache_hit_tokens: float = 0.0
    """``vllm:prefix_cache_hits_total`` (0 when not exported)."""
    kv_computed_tokens: float | None = None
    """``vllm:request_prefill_kv_computed_tokens_sum`` (None = not exported)."""


def parse_engine_metrics(text: str) -> EngineMetrics:
    """Pick vLLM's usage, queue and capacity metrics out of a Prometheus text page."""
    usage: list[float] = []
    running = waiting = 0.0
    seen_running = seen_waiting = False
    gpu_blocks: int | None = None
    block_size: int | None = None
    prefill_s: float | None = None
    prompt: float | None = None
    hits = 0.0
    computed: float | None = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vllm:request_prefill_time_seconds_sum":
                prefill_s = (prefill_s or 0.0) + s.value
            elif s.name == "vllm:request_prefill_kv_computed_tokens_sum":
                computed = (computed or 0.0) + s.value
            elif s.name == "vllm:prompt_tokens_total":
                prompt = (prompt or 0.0) + s.value
            elif s.name == "vllm:prefix_cache_hits_total":
                hits += s.value
            elif s.name == "vllm:kv_cache_usage_perc":
                usage.append(s.value)
            elif s.name == "vllm:num_requests_running":
                running += s.value
                seen_running = True
            elif s.name == "vllm:num_requests_waiting":
                waiting += s.value
                seen_waiting = True
            elif s.name.startswith("vllm:cache_config_info"):
                gb, bs = s.labels.get("num_gpu_blocks", ""), s.labels.get("block_size", "")
                if gb.isdigit():
                    gpu_blocks = (gpu_blocks or 0) + int(gb)
                if bs.isdigit():
                    block_size = int(bs)
    return EngineMetrics(
        usage_frac=sum(usage) / len(usage) if usage else None,
        running=int(running) if seen_running else None,
        waiting=int(waiting) if seen_waiting else None,
        num_gpu_blocks=gpu_blocks, engine_block_size=block_size, prefill_seconds=prefill_s,
        prompt_tokens=prompt, cache_hit_tokens=hits, kv_computed_tokens=computed)


class UsageProbe:
    """Reads usage for each heartbeat.

    ``learn_prefill_rate=False`` (agents of ``--role decode`` nodes): report no prefill rate.
    A decode-only engine prefills nothing a router sends it; what its prefill metrics hold is
    not a prefill rate (vLLM's decode instance counts received KV as cached and records one
    step per request, about one token: read as a rate it is tens of tokens/s), and no router
    drains queued prefill on it.
    """

    def __init__(self, metrics_url: str, held_blocks: Callable[[], int],
                 timeout_s: float = 2.0, learn_prefill_rate: bool = True) -> None:
        self._url = metrics_url
        self._held = held_blocks
        self.learn_prefill_rate = learn_prefill_rate
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.capacity_blocks = 0
        self.scrape_errors = 0
        self.prefill_rate = PrefillRateEstimator()

    async def _scrape(self) -> EngineMetrics | None:
        if not self._url:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(self._url) as resp:
                resp.raise_for_status()
                return parse_engine_metrics(await resp.text())
        except Exception as exc:  # any scrape failure falls back to event counts
            self.scrape_errors += 1
            if self.scrape_errors <= 3 or self.scrape_errors % 100 == 0:
                log.warning("engine metrics scrape of %s failed (%d so far): %r", self._url,
                            self.scrape_errors, exc)
            return None

    async def discover_capacity(self, block_size: int) -> int:
        """Capacity in kvroute blocks from ``vllm:cache_config_info`` (0 when not found)."""
        m = await self._scrape()
        if m is None or not m.num_gpu_blocks:
            return 0
        engine_bs = m.engine_block_size or block_size
        return m.num_gpu_blocks * engine_bs // block_size

    async def read(self) -> Usage:
        """Usage now: from the engine when possible, else from the events."""
        held = self._held()
        m = await self._scrape()
        if m is None:
            return Usage(used_blocks=held, queue_depth=0, running=0, from_engine=False)
        used = held
        if m.usage_frac is not None and self.capacity_blocks:
            used = round(max(0.0, min(1.0, m.usage_frac)) * self.capacity_blocks)
        rate = self.prefill_rate.rate
        if not self.learn_prefill_rate:
            rate = 0.0
        elif m.prefill_seconds is not None:
            if m.kv_computed_tokens is not None:  # aligned with the prefill time: exact
                rate = self.prefill_rate.update(m.kv_computed_tokens, m.prefill_seconds)
            elif m.prompt_tokens is not None:  # older vLLM: counters move at other moments
                rate = self.prefill_rate.update(
                    max(0.0, m.prompt_tokens - m.cache_hit_tokens), m.prefill_seconds,
                    aligned=False)
        return Usage(used_blocks=used, queue_depth=m.waiting or 0, running=m.running or 0,
                     from_engine=True, prefill_tokens_per_s=rate)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
