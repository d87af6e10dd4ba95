"""engine_sim + node_agent + registry + real etcd, all as processes: completions make blocks
appear in Lookup, evictions make them disappear, an engine restart under a live agent clears the
old blocks before new ones appear, a registry restarted on a fresh etcd gets a full resync, a
killed agent's node leaves within the lease TTL, SIGTERM deregisters and exits 0."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvroute.blocks import hash_blocks
from kvroute.embedded_etcd import EmbeddedEtcd
from kvroute.procs import ManagedProcess, free_port
from kvroute.v1 import registry_pb2 as pb
from kvroute.v1 import registry_pb2_grpc as pb_grpc
from tests.harness import ServerProcess, metric, scrape, start_server

pytestmark = pytest.mark.integration
TTL = 4
"""Node lease TTL. The agents beat every 0.3 s (their flag); the registry's suggested interval
(2 s) puts "late" (unhealthy, left out of Lookup) at 4.5 s without a heartbeat. With TTL 2 and
0.5 s, a 1.2-s stall of a loaded machine made node-a late for a moment, and the checks outside
a retry loop (the blocks held after the resync, the old blocks gone after the engine restart)
saw no node at all; a 1.7-s one expired its lease."""
MODEL = "sim-model"


def complete(http_port: int, prompt: list[int]) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/completions",
        data=json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def stub(target: str) -> tuple[grpc.Channel, pb_grpc.RegistryStub]:
    ch = grpc.insecure_channel(target)
    return ch, pb_grpc.RegistryStub(ch)


def matched(target: str, tokens: list[int]) -> dict[str, int]:
    ch, s = stub(target)
    with ch:
        resp = s.Lookup(pb.LookupRequest(block_hashes=hash_blocks(tokens, 16), model=MODEL),
                        timeout=5)
    return {n.node_id: n.matched_blocks for n in resp.nodes}


def nodes(target: str) -> dict[str, pb.NodeInfo]:
    ch, s = stub(target)
    with ch:
        return {n.node_id: n for n in s.ListNodes(pb.ListNodesRequest(), timeout=5).nodes}


def eventually(check: Callable[[], bool], within_s: float, what: str) -> float:
    t0 = time.monotonic()
    last: object = None
    while time.monotonic() - t0 < within_s:
        try:
            if check():
                return time.monotonic() - t0
        except grpc.RpcError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {within_s} s (last error {last})")


def engine_cached_blocks(sim: ServerProcess) -> int:
    """The engine's own count of cached blocks (its metrics port)."""
    return int(metric(scrape(sim.metrics_url), "kvroute_engine_sim_cached_blocks"))


def health_check(srv: ServerProcess) -> None:
    """The agent's gRPC health endpoint answers SERVING (Kubernetes probes)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(srv.grpc_target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def registry(etcd: str, prefix: str, port: int, tmp: Path, name: str) -> ServerProcess:
    return start_server("registry", [
        "--etcd-endpoints", etcd, "--etcd-prefix", prefix, "--lease-ttl-s", str(TTL),
        "--heartbeat-interval-s", "2", "--status-write-interval-s", "0.5",
        "--listen", f"127.0.0.1:{port}", "--replica-id", name], tmp, name=name)


def engine(ports: dict[str, int], tmp: Path, name: str) -> ServerProcess:
    return start_server("engine-sim", [
        "--listen", f"127.0.0.1:{ports['http']}", "--model", MODEL, "--block-size", "16",
        "--capacity-blocks", "40", "--time-scale", "0.01", "--topic", "kv",
        "--events-endpoint", f"tcp://127.0.0.1:{ports['events']}",
        "--replay-endpoint", f"tcp://127.0.0.1:{ports['replay']}"], tmp, name=name)


def agent(reg_port: int, ports: dict[str, int], tmp: Path, name: str) -> ServerProcess:
    return start_server("agent", [
        "--registry", f"127.0.0.1:{reg_port}", "--node-id", "node-a", "--model", MODEL,
        "--engine-url", f"http://127.0.0.1:{ports['http']}", "--capacity-blocks", "40",
        "--engine-events", f"tcp://127.0.0.1:{ports['events']}",
        "--engine-replay", f"tcp://127.0.0.1:{ports['replay']}", "--topic", "kv",
        "--engine-metrics-url", f"http://127.0.0.1:{ports['http']}/metrics",
        "--heartbeat-interval-s", "0.3", "--rpc-timeout-s", "2"], tmp, name=name)


def prompt(i: int, blocks: int = 4) -> list[int]:
    return list(range(10_000 * (i + 1), 10_000 * (i + 1) + 16 * blocks))


def test_agent_stack(etcd_endpoint: str, etcd_prefix: str, tmp_path: Path) -> None:
    reg_port = free_port()
    ports = {"http": free_port(), "events": free_port(), "replay": free_port()}
    reg = registry(etcd_endpoint, etcd_prefix, reg_port, tmp_path, "reg1")
    sim = engine(ports, tmp_path, "sim1")
    ag = agent(reg_port, ports, tmp_path, "agent1")
    fresh: EmbeddedEtcd | None = None
    target = f"127.0.0.1:{reg_port}"
    try:
        # completions -> blocks in Lookup
        complete(ports["http"], prompt(0))
        eventually(lambda: matched(target, prompt(0)) == {"node-a": 4}, 10, "blocks indexed")
        health_check(ag)
        # the gauge goes to 1 when the first heartbeat after registration + resync is answered:
        # the resync's blocks can be visible in Lookup a moment before that
        eventually(lambda: "kvroute_agent_registry_connected 1.0" in scrape(ag.metrics_url), 10,
                   "agent reports registry_connected 1")
        agent_metrics = scrape(ag.metrics_url)
        assert "kvroute_agent_events_parsed_total" in agent_metrics
        info = nodes(target)["node-a"]
        assert info.address == f"http://127.0.0.1:{ports['http']}"
        assert info.capacity_blocks == 40

        # evictions (capacity 40 blocks) -> prompt 0 leaves the index
        for i in range(1, 12):
            complete(ports["http"], prompt(i))
        eventually(lambda: matched(target, prompt(0)) == {"node-a": 0}, 10, "evicted blocks")
        eventually(lambda: matched(target, prompt(11)) == {"node-a": 4}, 10, "latest blocks")
        eventually(lambda: nodes(target)["node-a"].evictions_total > 0, 15, "evictions counted")
        truth = engine_cached_blocks(sim)
        eventually(lambda: nodes(target)["node-a"].blocks_indexed == truth, 15, "index = engine")

        # registry restarted on a fresh etcd -> re-register + full resync, index complete
        assert reg.stop() == 0
        fresh = EmbeddedEtcd(tmp_path / "etcd-fresh").start()
        reg = registry(fresh.endpoint, "/kvroute/v1/", reg_port, tmp_path, "reg2")
        eventually(lambda: matched(target, prompt(11)) == {"node-a": 4}, 15, "index after resync")
        held = [i for i in range(1, 12) if matched(target, prompt(i)).get("node-a") == 4]
        assert len(held) >= 9  # ~40 blocks = the last 10 prompts; all back after the resync
        assert nodes(target)["node-a"].blocks_indexed == truth == engine_cached_blocks(sim)

        # engine restarted under the live agent: old blocks cleared before new ones appear
        assert sim.stop() == 0
        sim = engine(ports, tmp_path, "sim2")
        complete(ports["http"], prompt(50))

        def new_only() -> bool:
            if matched(target, prompt(50)) != {"node-a": 4}:
                return False
            assert matched(target, prompt(11)) == {"node-a": 0}, "old blocks outlived restart"
            return True
        eventually(new_only, 15, "blocks of the new engine incarnation")
        assert nodes(target)["node-a"].blocks_indexed == 4

        # SIGTERM: deregister and exit 0
        assert ag.stop() == 0
        eventually(lambda: "node-a" not in nodes(target), 2, "deregistered node gone")

        # SIGKILL: the node leaves routing within the lease TTL
        ag = agent(reg_port, ports, tmp_path, "agent2")
        eventually(lambda: "node-a" in nodes(target), 10, "agent back")
        ag.process.kill()
        took = eventually(lambda: "node-a" not in nodes(target), TTL + 3, "killed node expires")
        assert took <= TTL + 3
    finally:
        for p in (ag, sim, reg):
            p.stop()
        if fresh is not None:
            fresh.stop()


def test_block_size_mismatch_exits_loudly(etcd_endpoint: str, etcd_prefix: str,
                                          tmp_path: Path) -> None:
    reg_port = free_port()
    reg = registry(etcd_endpoint, etcd_prefix, reg_port, tmp_path, "reg")
    ports = {"http": free_port(), "events": free_port(), "replay": free_port()}
    try:
        proc = ManagedProcess("agent-bs", [
            sys.executable, "-m", "cli.main", "serve", "agent", "--registry",
            f"127.0.0.1:{reg_port}", "--node-id", "n", "--model", MODEL, "--engine-url",
            "http://x:1", "--capacity-blocks", "8", "--block-size", "32",
            "--engine-health-path", "",  # no engine here: register without waiting for one
            "--engine-events", f"tcp://127.0.0.1:{ports['events']}"],
            tmp_path / "agent-bs.log").start()
        assert proc.proc is not None
        code = proc.proc.wait(20)
        proc.stop()
        assert code == 4
        log = (tmp_path / "agent-bs.log").read_text()
        assert "block size mismatch" in log and "refusing to run" in log
    finally:
        reg.stop()


def test_legacy_wire_formats_end_to_end(tmp_path: Path) -> None:
    """Positional events, bytes hashes and [seq, payload] replay replies, with a gap on
    purpose: the agent joins after the engine published, so it must replay from 0."""
    reg_port = free_port()
    ports = {"http": free_port(), "events": free_port(), "replay": free_port()}
    reg = start_server("registry", ["--store", "memory", "--listen", f"127.0.0.1:{reg_port}",
                                    "--heartbeat-interval-s", "0.5"], tmp_path, name="reg")
    sim = start_server("engine-sim", [
        "--listen", f"127.0.0.1:{ports['http']}", "--model", MODEL, "--capacity-blocks", "64",
        "--time-scale", "0.01", "--topic", "kv", "--encoding", "positional",
        "--hash-type", "bytes", "--replay-form", "legacy",
        "--events-endpoint", f"tcp://127.0.0.1:{ports['events']}",
        "--replay-endpoint", f"tcp://127.0.0.1:{ports['replay']}"], tmp_path, name="sim")
    ag: ServerProcess | None = None
    target = f"127.0.0.1:{reg_port}"
    try:
        complete(ports["http"], prompt(0))  # published before any agent listens
        ag = agent(reg_port, ports, tmp_path, "agent")
        complete(ports["http"], prompt(1))
        eventually(lambda: matched(target, prompt(1)) == {"node-a": 4}, 10, "live blocks")
        eventually(lambda: matched(target, prompt(0)) == {"node-a": 4}, 10, "replayed blocks")
        text = scrape(ag.metrics_url)
        values = dict(line.rsplit(" ", 1) for line in text.splitlines()
                      if line and not line.startswith("#"))
        assert float(values["kvroute_agent_replayed_batches_total"]) >= 1
        assert float(values['kvroute_agent_parse_errors_total{reason="bad_frame"}']) == 0
        assert float(values["kvroute_agent_events_lost_total"]) == 0
    finally:
        for p in (ag, sim, reg):
            if p is not None:
                p.stop()
