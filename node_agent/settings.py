"""Settings of ``kvroute serve agent`` (flags and ``KVROUTE_*`` variables)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from kvroute.common_settings import ClientTLSSettings, ServerSettings
from kvroute.errors import ConfigError
from kvroute.settings import require, setting
from kvroute.targets import parse_targets
from node_agent.block_map import MEDIUM_POLICIES

_NODE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class AgentSettings(ServerSettings, ClientTLSSettings):
    """One node agent beside one engine (one data-parallel rank)."""

    registry: str = setting(
        "127.0.0.1:50051", "Registry gRPC address HOST:PORT, or several replicas as a comma "
        "list HOST:PORT,HOST:PORT (the agent uses one and moves to the next when it fails); a "
        "DNS name resolving to several addresses (headless Service) also fails over")
    node_id: str = setting("", "Stable node id, unique in the fleet (e.g. the pod name); "
                           "1-128 characters of [A-Za-z0-9._:-]")
    engine_url: str = setting(
        "", "The engine's inference URL clients are sent to (advertised to the registry), "
        "e.g. http://10.0.0.5:8000")
    model: str = setting("", "Model served by the engine (lookups only match the same model)")
    block_size: int = setting(16, "kvroute block size in tokens; must equal the registry's. "
                              "Engine blocks of another size are re-chunked")
    capacity_blocks: int = setting(
        0, "KV-cache capacity in kvroute blocks (0 = read vllm:cache_config_info from "
        "--engine-metrics-url)")
    engine_events: str = setting("tcp://127.0.0.1:5557",
                                 "Engine KV-event PUB endpoint to subscribe to (tcp://HOST:PORT)")
    engine_replay: str = setting(
        "", "Engine replay ROUTER endpoint (tcp://HOST:PORT); empty = no replay, a gap "
        "triggers a full resync")
    engine_format: str = setting("vllm", "Engine event format: vllm or sglang")
    engine_block_size: int = setting(
        0, "The engine's own block size (vLLM --block-size, SGLang --page-size); 0 = the "
        "largest block size its events carry. Matches are rounded down to whole engine blocks "
        "and shorter SGLang pages are partial (never indexed)")
    engine_metrics_url: str = setting(
        "", "Engine Prometheus URL (e.g. http://127.0.0.1:8000/metrics) for KV usage, running "
        "and waiting requests; empty = usage from the events")
    topic: str = setting("", "ZMQ topic prefix to subscribe to (vLLM default: empty = all)")
    heartbeat_interval_s: float = setting(
        0.0, "Seconds between heartbeats (0 = the interval the registry suggests)")
    rpc_timeout_s: float = setting(
        5.0, "Deadline of each registry call, seconds (keep it over 3 s: the registry holds "
        "a large refused write up to 3 s before answering, --client-refused-bytes-per-s)")
    registry_retry_max_s: float = setting(
        1.0, "Longest back-off between attempts to reach the registry (jittered); gRPC's own "
        "reconnect back-off is capped the same, so a registry that returns is used within "
        "about this long")
    engine_health_path: str = setting(
        "/health", "Path on --engine-url polled every heartbeat interval (at most 5 times a "
        "second); while it fails the node leaves routing (deregistered) and returns once it "
        "answers 200. Empty = off")
    engine_health_timeout_s: float = setting(
        2.0, "Deadline of one engine health check, seconds")
    engine_health_failures: int = setting(
        3, "Failed health checks in a row (timeouts, HTTP errors) before the engine counts "
        "as down (a busy engine may answer late); a refused connection (engine process "
        "gone) counts at once")
    replay_timeout_s: float = setting(2.0, "Seconds to wait for each replay reply")
    medium_policy: str = setting(
        "device", "Which cached blocks count: device (only --device-media; offloaded copies "
        "ignored) or any (offloaded copies count as cached)")
    device_media: tuple[str, ...] = setting(("GPU",), "Medium names of the device cache")
    labels: tuple[str, ...] = setting((), "Node labels as key=value,key=value")
    role: str = setting(
        "both", "Disaggregated prefill/decode role of the engine: prefill (computes prompts and "
        "hands their KV over), decode (receives KV and generates) or both (aggregated)")
    resync_batch: int = setting(50_000, "Block hashes per Resync stream message")
    max_delta_hashes: int = setting(100_000, "Most block hashes in one heartbeat")
    fleet_file: str = setting(
        "", "Run several agents in this one process (a simulated fleet for benches and demos): "
        "a JSON list of objects with node_id, engine_url, engine_events and optionally "
        "engine_replay, engine_metrics_url, capacity_blocks, labels; every other setting comes "
        "from the flags. Each agent is the full agent (own engine subscription, own registry "
        "link); health is served once, metrics per agent on free ports")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_targets(self.registry, "registry")
        require(bool(self.model), "model", "required: the model the engine serves")
        require(1 <= self.block_size <= 65536, "block_size", "must be 1..65536")
        require(0 <= self.engine_block_size <= 65536, "engine_block_size", "must be 0..65536")
        require(self.capacity_blocks >= 0, "capacity_blocks", "must be >= 0")
        require(self.engine_format in ("vllm", "sglang"), "engine_format",
                "must be vllm or sglang")
        require(self.heartbeat_interval_s >= 0, "heartbeat_interval_s", "must be >= 0")
        require(self.rpc_timeout_s > 0, "rpc_timeout_s", "must be > 0")
        require(self.registry_retry_max_s > 0, "registry_retry_max_s", "must be > 0")
        require(not self.engine_health_path or self.engine_health_path.startswith("/"),
                "engine_health_path", "must start with / (or be empty to disable)")
        require(self.engine_health_timeout_s > 0, "engine_health_timeout_s", "must be > 0")
        require(self.engine_health_failures >= 1, "engine_health_failures", "must be >= 1")
        require(self.replay_timeout_s > 0, "replay_timeout_s", "must be > 0")
        require(self.medium_policy in MEDIUM_POLICIES, "medium_policy",
                f"must be one of {', '.join(MEDIUM_POLICIES)}")
        require(self.role in ("both", "prefill", "decode"), "role",
                "must be prefill, decode or both")
        require(self.resync_batch >= 1, "resync_batch", "must be >= 1")
        require(self.max_delta_hashes >= 1, "max_delta_hashes", "must be >= 1")
        for item in self.labels:
            require("=" in item and bool(item.split("=", 1)[0]), "labels",
                    f"expected key=value, got {item!r}")
        if self.fleet_file:
            return  # the node-specific settings are checked per agent (fleet_agents)
        require(bool(_NODE_ID.match(self.node_id)), "node_id",
                "required: 1-128 characters of [A-Za-z0-9._:-] (e.g. the pod name)")
        require(bool(self.engine_url), "engine_url", "required: the engine's inference URL")
        require(self.capacity_blocks > 0 or bool(self.engine_metrics_url), "capacity_blocks",
                "required (> 0) unless --engine-metrics-url can report it")
        require(self.engine_events.startswith(("tcp://", "ipc://")), "engine_events",
                "expected tcp://HOST:PORT (or ipc://PATH)")
        require("*" not in self.engine_events + self.engine_replay, "engine_events",
                "the agent connects: give the engine's address (tcp://127.0.0.1:5557), not the "
                "engine's bind pattern tcp://*:5557")
        require(not self.engine_replay or self.engine_replay.startswith(("tcp://", "ipc://")),
                "engine_replay", "expected tcp://HOST:PORT (or ipc://PATH)")

    @property
    def label_map(self) -> dict[str, str]:
        """Labels as a dict."""
        return dict(item.split("=", 1) for item in self.labels)


_FLEET_FIELDS = {"node_id": str, "engine_url": str, "engine_events": str, "engine_replay": str,
                 "engine_metrics_url": str, "capacity_blocks": int, "labels": list,
                 "role": str}


def fleet_agents(s: AgentSettings) -> list[AgentSettings]:
    """The agents of a process: ``s`` itself, or one per entry of ``--fleet-file``.

    Raises ConfigError naming the entry and field when the file is unreadable or wrong.
    """
    if not s.fleet_file:
        return [s]
    try:
        with open(s.fleet_file, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--fleet-file: cannot read {s.fleet_file}: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise ConfigError("--fleet-file: expected a non-empty JSON list of agent objects")
    out: list[AgentSettings] = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"--fleet-file: entry {k} is not an object")
        unknown = set(entry) - set(_FLEET_FIELDS)
        if unknown:
            raise ConfigError(f"--fleet-file: entry {k}: unknown field(s) "
                              f"{', '.join(sorted(unknown))} (allowed: "
                              f"{', '.join(_FLEET_FIELDS)})")
        for name, typ in _FLEET_FIELDS.items():
            if name in entry and not isinstance(entry[name], typ):
                raise ConfigError(f"--fleet-file: entry {k}: {name} must be a {typ.__name__}")
        over = dict(entry)
        if "labels" in over:
            over["labels"] = tuple(str(x) for x in over["labels"])
        try:
            out.append(dataclasses.replace(s, fleet_file="", ready_file="",
                                           listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
                                           **over))
        except ConfigError as exc:
            raise ConfigError(f"--fleet-file: entry {k}: {exc}") from exc
    ids = [a.node_id for a in out]
    if len(set(ids)) != len(ids):
        raise ConfigError("--fleet-file: node_id values must be distinct")
    return out
