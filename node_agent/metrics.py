"""The agent's Prometheus metrics, read from its components' counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from node_agent.block_map import BlockMap
from node_agent.events import IndexHealth, IndexState, ParseStats
from node_agent.registry_link import LinkStats
from node_agent.usage import UsageProbe
from node_agent.zmq_source import SourceStats

P = "kvroute_agent_"


class AgentCollector(Collector):
    """Exports parser, source, block-map and registry-link counters."""

    def __init__(self, parse: ParseStats, source: SourceStats, blocks: BlockMap,
                 link: LinkStats, usage: UsageProbe, health: IndexHealth | None = None) -> None:
        self._parse, self._source, self._blocks = parse, source, blocks
        self._link, self._usage = link, usage
        self._health = health if health is not None else IndexHealth()

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Build the metric families from the current counters."""
        p, s, b, lk = self._parse, self._source, self._blocks, self._link

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(P + name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(P + name, doc, value=value)

        yield counter("events_parsed", "Engine KV events decoded", p.events)
        yield counter("batches_parsed", "Engine event batches decoded", p.batches)
        errs = CounterMetricFamily(P + "parse_errors", "Payloads or events skipped, by reason",
                                   labels=["reason"])
        for reason, n in sorted(dict(p.errors).items()):
            errs.add_metric([reason], n)
        errs.add_metric(["bad_frame"], s.bad_frames)
        yield errs
        yield counter("sequence_gaps", "Sequence gaps seen on the live stream", s.gaps)
        yield counter("replays", "Replay requests sent to the engine", s.replays)
        yield counter("replays_failed", "Replay requests that timed out", s.replays_failed)
        yield counter("replayed_batches", "Batches received through replay", s.replayed_batches)
        yield counter("events_lost", "Gaps that could not be replayed (resync sent)",
                      s.events_lost)
        yield counter("engine_restarts", "Engine restarts seen (sequence went back)",
                      s.engine_restarts)
        yield counter("duplicate_batches", "Live batches already received by replay",
                      s.duplicates)
        yield gauge("event_lag_seconds", "Now minus the engine timestamp of the last live batch",
                    s.lag_s)
        yield gauge("last_sequence", "Sequence number of the last live batch", s.last_seq)
        skipped = CounterMetricFamily(P + "block_events_skipped",
                                      "Blocks not indexed, by reason", labels=["reason"])
        for reason, n in sorted(dict(b.skipped).items()):
            skipped.add_metric([reason], n)
        yield skipped
        yield gauge("blocks_held", "Canonical blocks the engine holds on its device (GPU), "
                    "the registry's device tier", b.held_blocks)
        yield gauge("blocks_offloaded", "Canonical blocks held on an offloading medium (CPU, "
                    "CPU_PINNED, DISK...), the registry's lower tier", b.offloaded_blocks)
        yield gauge("engine_blocks_tracked", "Engine blocks tracked", b.engine_blocks)
        yield counter("evictions", "Canonical blocks evicted by the engine", b.evictions_total)
        yield counter("registrations", "RegisterNode calls that succeeded", lk.registrations)
        yield counter("heartbeats", "Heartbeats answered", lk.heartbeats)
        yield counter("heartbeat_failures", "Registry calls that failed", lk.heartbeat_failures)
        yield counter("resyncs", "Full resyncs sent", lk.resyncs)
        yield gauge("last_resync_blocks", "Blocks sent in the last resync", lk.resync_blocks)
        yield gauge("heartbeat_bytes", "Serialized size of the last heartbeat",
                    lk.last_heartbeat_bytes)
        yield gauge("registry_connected", "1 while heartbeats succeed", int(lk.connected))
        yield gauge("engine_up", "1 while the engine passes its health check (the node is "
                    "in routing only then)", int(lk.engine_up))
        yield counter("engine_down", "Times the engine failed its health check and the node "
                      "left routing", lk.engine_downs)
        yield counter("registry_switches", "Moves to another registry address after a "
                      "connectivity failure", lk.registry_switches)
        yield counter("topic_mismatches", "Live batches ignored: their topic is not --topic",
                      s.topic_mismatches)
        yield counter("late_joins", "Starts (or replays) that could not learn the engine's "
                      "earlier batches", s.late_joins)
        state = GaugeMetricFamily(P + "index_state", "1 for the index's current state "
                                  "(complete, partial, no_events)", labels=["state"])
        for st in IndexState:
            state.add_metric([st.name.lower()], int(self._health.state is st))
        yield state
        yield gauge("engine_block_size", "The engine's block size in tokens (0 = not known)",
                    b.engine_block_size)
        yield counter("engine_metrics_scrape_errors", "Failed scrapes of the engine's /metrics",
                      self._usage.scrape_errors)


def agent_registry(collector: AgentCollector) -> CollectorRegistry:
    """A fresh CollectorRegistry with the agent's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg
