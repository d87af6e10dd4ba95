"""KV usage, running and waiting requests from the engine's Prometheus endpoint.

Reads vLLM's gauges ``vllm:kv_cache_usage_perc`` (fraction, 1 = full; averaged over engines),
``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` (summed), and the capacity from
``vllm:cache_config_info`` (labels ``num_gpu_blocks``, ``block_size``). Without a URL, or when
a scrape fails, usage is the count of blocks the events say the engine holds and the queue is 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a heartbeat reports about load."""

    used_blocks: int
    queue_depth: int
    running: int
    from_engine: bool


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """Values read from one scrape (None = not exported)."""

    usage_frac: float | None
    running: int | None
    waiting: int | None
    num_gpu_blocks: int | None
    engine_block_size: int | None


def parse_engine_metrics(text: str) -> EngineMetrics:
    """Pick vLLM's usage, queue and capacity metrics out of a Prometheus text page."""
    usage: list[float] = []
    running = waiting = 0.0
    seen_running = seen_waiting = False
    gpu_blocks: int | None = None
    block_size: int | None = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vllm:kv_cache_usage_perc":
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
        num_gpu_blocks=gpu_blocks, engine_block_size=block_size)


class UsageProbe:
    """Reads usage for each heartbeat."""

    def __init__(self, metrics_url: str, held_blocks: Callable[[], int],
                 timeout_s: float = 2.0) -> None:
        self._url = metrics_url
        self._held = held_blocks
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.capacity_blocks = 0
        self.scrape_errors = 0

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
        return Usage(used_blocks=used, queue_depth=m.waiting or 0, running=m.running or 0,
                     from_engine=True)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
