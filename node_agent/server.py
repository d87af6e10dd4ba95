"""Runs one node agent (or, with ``--fleet-file``, several in one process): engine events in,
registry heartbeats out, health and /metrics.

Exit codes: 0 after SIGTERM/SIGINT (the node is deregistered first), 4 when the registry refuses
the node's configuration (block size, hash scheme, model, bad id), 1 on an unexpected error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc

from kvroute.aio import cancel_and_wait
from kvroute.grpcutil import add_health_and_reflection, bind, server_options
from kvroute.procs import write_ready_file
from kvroute.settings import describe, parse_hostport
from kvroute.telemetry import MetricsServer, configure_logging
from node_agent.block_map import BlockMap
from node_agent.deltas import DeltaLog
from node_agent.engine_health import EngineHealth
from node_agent.events import (
    Cleared,
    EngineBatch,
    EventSource,
    IndexHealth,
    IndexState,
    PayloadParser,
    SignalKind,
)
from node_agent.metrics import AgentCollector, agent_registry
from node_agent.parse_sglang import SglangParser
from node_agent.parse_vllm import VllmParser
from node_agent.registry_link import RegistrationRefused, RegistryLink
from node_agent.settings import AgentSettings, fleet_agents
from node_agent.usage import UsageProbe
from node_agent.zmq_source import ZmqEventSource

log = logging.getLogger(__name__)

EXIT_REFUSED = 4
"""Exit code when the registry refuses the node (configuration mismatch)."""


class Agent:
    """The agent's parts wired together (usable in-process by tests)."""

    def __init__(self, s: AgentSettings) -> None:
        self.settings = s
        self.parser: PayloadParser = SglangParser() if s.engine_format == "sglang" \
            else VllmParser()
        self.health = IndexHealth()
        self.source = ZmqEventSource(s.engine_events, self.parser,
                                     replay_endpoint=s.engine_replay, topic=s.topic,
                                     replay_timeout_s=s.replay_timeout_s, health=self.health)
        self.deltas = DeltaLog(s.max_delta_hashes)
        self.blocks = BlockMap(s.block_size, self.deltas, medium_policy=s.medium_policy,
                               device_media=s.device_media, capacity_blocks=s.capacity_blocks,
                               engine_block_size=s.engine_block_size)
        self.usage = UsageProbe(s.engine_metrics_url, lambda: self.blocks.held_blocks,
                                timeout_s=min(2.0, s.rpc_timeout_s),
                                learn_prefill_rate=s.role != "decode")
        self.usage.capacity_blocks = s.capacity_blocks
        self.link = RegistryLink(s, self.blocks, self.deltas, self.usage, self.health)
        self.engine_health: EngineHealth | None = None
        if s.engine_health_path:
            self.engine_health = EngineHealth(
                s.engine_url.rstrip("/") + s.engine_health_path, s.engine_health_timeout_s,
                s.engine_health_failures, lambda: self.link.interval_s, self._engine_down,
                self.link.engine_up)
            self.link.await_engine()  # register only once the engine answers
        self._warned_sizes: set[int] = set()

    def _engine_down(self, why: str, process_gone: bool) -> None:
        if process_gone and self.blocks.held_blocks:
            # the engine process is gone and its KV cache with it: never re-register them
            log.warning("engine process gone: dropping %d cached blocks it held",
                        self.blocks.held_blocks)
            self.blocks.clear()
        self.link.engine_down(why)

    async def discover_capacity(self) -> None:
        """Fill capacity from the engine's metrics when not configured; waits (logging) for an
        engine that is still starting, as long as it takes."""
        attempt = 0
        while not self.usage.capacity_blocks:
            cap = await self.usage.discover_capacity(self.settings.block_size)
            if cap:
                self.usage.capacity_blocks = self.blocks.capacity_blocks = cap
                log.info("engine capacity from vllm:cache_config_info: %d blocks", cap)
                return
            attempt += 1
            if attempt in (1, 10) or attempt % 60 == 0:
                log.warning("waiting for %s to report vllm:cache_config_info num_gpu_blocks "
                            "(or set --capacity-blocks)", self.settings.engine_metrics_url)
            await asyncio.sleep(min(5.0, 0.5 * attempt))

    async def run(self) -> None:
        """Capacity (if needed), then events and the registry link until one fails."""
        await self.discover_capacity()
        tasks = [asyncio.create_task(self.consume(), name="events"),
                 asyncio.create_task(self.link.run(), name="registry")]
        if self.engine_health is not None:
            tasks.append(asyncio.create_task(self.engine_health.run(), name="engine-health"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
        finally:
            await cancel_and_wait(*tasks, errors_too=True)

    async def consume(self, source: EventSource | None = None) -> None:
        """Apply engine events to the block map until cancelled."""
        async for item in (source or self.source).items():
            if isinstance(item, EngineBatch):
                wake = False
                for ev in item.batch.events:
                    try:
                        self.blocks.apply(ev)
                    except Exception:  # never let one event stop the agent
                        self.blocks.skipped["internal_error"] += 1
                        log.exception("failed to apply engine event")
                    if isinstance(ev, Cleared):
                        wake = True
                        if self.health.state is not IndexState.COMPLETE:
                            # an empty cache: everything from here on is seen
                            self.health.set(IndexState.COMPLETE)
                            log.info("engine cleared its cache: index complete again")
                self._check_sizes()
                if wake:
                    self.link.wake()
            elif item.kind is SignalKind.ENGINE_RESTART:
                self.blocks.clear()
                self.link.request_resync(f"engine restarted ({item.detail})")
            else:
                self.link.request_resync(f"engine events lost ({item.detail})")

    def _check_sizes(self) -> None:
        new = self.blocks.engine_block_sizes - self._warned_sizes
        for ebs in new:
            self._warned_sizes.add(ebs)
            if ebs != self.settings.block_size and ebs == self.blocks.engine_block_size:
                log.warning("engine block size %d differs from kvroute's %d: re-chunking "
                            "engine blocks into %d-token canonical blocks; the router counts "
                            "only whole %d-token engine blocks as reusable", ebs,
                            self.settings.block_size, self.settings.block_size, ebs)

    def collector(self) -> AgentCollector:
        """Metrics collector over the agent's counters."""
        return AgentCollector(self.parser.stats, self.source.stats, self.blocks,
                              self.link.stats, self.usage, self.health)


async def serve(s: AgentSettings) -> int:
    """Run the agent(s) of ``s`` (one, or one per ``--fleet-file`` entry) until SIGTERM; returns
    the exit code. One refused or failed agent stops them all."""
    configs = fleet_agents(s)
    log.info("node agent starting (%d agent(s)): %s", len(configs), describe(s))
    agents = [Agent(c) for c in configs]
    server = grpc.aio.server(options=server_options())
    health = add_health_and_reflection(server, [])
    grpc_port = bind(server, s.listen, s.server_tls)
    metrics = [MetricsServer(agent_registry(a.collector()),
                             *parse_hostport(c.metrics_listen, "metrics_listen"))
               for a, c in zip(agents, configs, strict=True)]
    await server.start()
    metrics_ports = [m.start() for m in metrics]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    tasks: list[asyncio.Task[None]] = []
    try:
        await health.set_serving(True)  # liveness: the process runs; never tied to the registry
        write_ready_file(s.ready_file, {
            "grpc_port": grpc_port, "metrics_port": metrics_ports[0], "pid": os.getpid(),
            "agents": [{"node_id": c.node_id, "metrics_port": p}
                       for c, p in zip(configs, metrics_ports, strict=True)]})
        log.info("node agent(s) %s serving: health on :%d, metrics on %s",
                 ", ".join(c.node_id for c in configs), grpc_port, metrics_ports)
        tasks = [asyncio.create_task(a.run(), name=f"agent {a.settings.node_id}")
                 for a in agents]
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for t in tasks:
            if t.done():
                t.result()  # raises what stopped the agent
                raise RuntimeError(f"{t.get_name()} stopped unexpectedly")
        log.info("shutting down")
    except RegistrationRefused as exc:
        log.error("refusing to run: %s", exc)
        code = EXIT_REFUSED
    except Exception:
        log.exception("node agent failed")
        code = 1
    finally:
        try:
            await cancel_and_wait(*tasks, errors_too=True)
        finally:  # also when this task is cancelled while waiting
            await health.set_serving(False)
            await asyncio.gather(*(_close(a, deregister=code == 0) for a in agents),
                                 return_exceptions=True)
            await server.stop(grace=min(1.0, s.drain_timeout_s))
            for m in metrics:
                m.stop()
    return code


async def _close(agent: Agent, deregister: bool) -> None:
    if deregister:
        await agent.link.deregister()
    await agent.link.close()
    await agent.source.close()
    await agent.usage.close()


def main(s: AgentSettings) -> int:
    """Configure logging and run (ConfigError for a bad ``--fleet-file`` before starting)."""
    configure_logging(s.log_format, s.log_level)
    fleet_agents(s)  # validate the fleet file up front: exit 2 with a message, not a traceback
    return asyncio.run(serve(s))
