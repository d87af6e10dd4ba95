"""Prometheus metrics of engine_sim: vLLM's names (``vllm/v1/metrics/loggers.py``) + our own.

vLLM's: gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc`` (a fraction), counters ``vllm:prefix_cache_queries_total`` and
``vllm:prefix_cache_hits_total`` (tokens), ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``, ``vllm:request_success_total``, histograms
``vllm:time_to_first_token_seconds`` (model seconds), ``vllm:request_prefill_time_seconds``
(sum and count only; finished requests; **wall** seconds = model seconds x ``--time-scale``, so
the prefill rate an agent derives from it is the rate on the clock routers run on) and
``vllm:request_prefill_kv_computed_tokens`` (sum and count; finished requests; a decode
engine's received KV is in neither, as on vLLM's decode instance, whose KV wait is queue time
and whose received tokens count as cached: ``kvroute_engine_sim_kv_received_*``). Each moves
when vLLM v1 moves it: prefix-cache queries/hits when a request is scheduled (admitted),
``prompt_tokens`` when its prefill yields the first token, the per-request histograms when it
finishes (``vllm/v1/metrics/stats.py``). Labels
``model_name`` and ``engine``; and
``vllm:cache_config_info`` (value 1, the cache config as labels: ``block_size``,
``num_gpu_blocks``, ...), from which a node agent reads the engine's KV capacity. Ours:
``kvroute_engine_sim_*`` (evictions, stored blocks, hits by request, events). Values are read
from the engine at scrape time by a collector on a per-server registry.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from engine_sim.engine import SimEngine


class EngineCollector(Collector):
    """Reads the engine's counters and gauges on every scrape."""

    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family."""
        e = self._engine
        c = e.cache.counters
        labels = ["model_name", "engine"]
        values = [e.settings.model, str(e.settings.data_parallel_rank)]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=labels)
            m.add_metric(values, value)
            return m

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    e.model.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    e.model.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    e.cache.usage)
        yield counter("vllm:prefix_cache_queries",
                      "Prefix cache queries, in terms of number of queried tokens.",
                      c.queries_tokens)
        yield counter("vllm:prefix_cache_hits",
                      "Prefix cache hits, in terms of number of cached tokens.", c.hits_tokens)
        # counted when the prefill yields the first token, as vLLM's IterationStats does
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                      e.model.prompt_tokens_at_first_token(e.now()))
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      e.completion_tokens_total)
        yield counter("vllm:request_success", "Count of successfully processed requests.",
                      e.model.finished_total)
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine "
                                 "CacheConfig", labels=["block_size", "enable_prefix_caching",
                                                        "num_gpu_blocks", "engine"])
        info.add_metric([str(e.settings.block_size), "True", str(e.cache.capacity),
                         str(e.settings.data_parallel_rank)], 1.0)
        yield info
        yield e.ttft.family(labels, values)
        h = HistogramMetricFamily("vllm:request_prefill_time_seconds",
                                  "Histogram of time spent in PREFILL phase for request.",
                                  labels=labels)
        # wall seconds, as a real engine measures them: an agent derives the engine's prefill
        # rate from this, and routers drain their queued-prefill estimates on the wall clock
        h.add_metric(values, [("+Inf", float(e.model.finished_total))],
                     e.model.prefill_seconds_total * e.settings.time_scale)
        yield h
        # observed per finished request, with its prefill time (the aligned pair an agent
        # derives the prefill rate from)
        kv = HistogramMetricFamily("vllm:request_prefill_kv_computed_tokens",
                                   "Histogram of new KV tokens computed during prefill "
                                   "(excluding cached tokens).", labels=labels)
        kv.add_metric(values, [("+Inf", float(e.model.finished_total))],
                      float(e.model.prefill_computed_tokens_total))
        yield kv
        # a decode engine's receipts (not in the prefill histograms above, as in vLLM)
        yield counter("kvroute_engine_sim_kv_received_blocks",
                      "KV blocks received from prefill engines (finished requests).",
                      e.model.kv_received_blocks_total)
        yield counter("kvroute_engine_sim_kv_received_seconds",
                      "Wall seconds spent receiving KV from prefill engines (finished requests).",
                      e.model.kv_received_seconds_total * e.settings.time_scale)
        yield counter("kvroute_engine_sim_evicted_blocks", "KV blocks evicted (LRU).",
                      c.evicted_blocks)
        yield counter("kvroute_engine_sim_stored_blocks", "KV blocks stored in the cache.",
                      c.stored_blocks)
        yield counter("kvroute_engine_sim_requests", "Requests admitted (cache looked up).",
                      c.requests)
        yield counter("kvroute_engine_sim_requests_with_hit",
                      "Admitted requests that reused at least one cached block.",
                      c.requests_with_hit)
        yield counter("kvroute_engine_sim_requests_aborted", "Requests aborted by the client.",
                      e.model.aborted_total)
        yield counter("kvroute_engine_sim_cache_resets", "Prefix cache resets (AllBlocksCleared).",
                      c.cleared)
        yield counter("kvroute_engine_sim_event_batches", "KV event batches published.",
                      e.publisher.batches_total)
        yield counter("kvroute_engine_sim_events", "KV events published.",
                      e.publisher.events_total)
        yield counter("kvroute_engine_sim_replay_requests", "Replay requests answered.",
                      e.publisher.replay_requests_total)
        yield gauge("kvroute_engine_sim_cached_blocks",
                    "Blocks in the cache (in use or evictable).",
                    e.cache.cached_blocks)
        yield gauge("kvroute_engine_sim_used_blocks", "Blocks held by running requests.",
                    e.cache.used_blocks)
        yield gauge("kvroute_engine_sim_capacity_blocks", "KV cache capacity in blocks.",
                    e.cache.capacity)
        yield gauge("kvroute_engine_sim_pending_prefill_tokens",
                    "Prompt tokens admitted or queued whose prefill has not finished.",
                    e.model.pending_prefill_tokens(e.now()))


def make_registry(engine: SimEngine) -> CollectorRegistry:
    """A fresh registry holding the engine's collector (never the global default one)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(engine))
    return reg
