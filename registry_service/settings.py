"""Settings of the registry server (``kvroute serve registry``): flags and ``KVROUTE_*`` vars."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvroute.common_settings import ServerSettings
from kvroute.settings import require, setting
from registry_service.relay_settings import RelaySettings
from registry_service.security_settings import SecuritySettings
from registry_service.store.etcd_settings import EtcdSettings


@dataclass(frozen=True)
class RegistrySettings(ServerSettings, EtcdSettings, SecuritySettings, RelaySettings):
    """Everything the registry reads at start. Each field is a flag and an env variable.

    The ``etcd_*`` fields come from :class:`EtcdSettings` (the etcd client's own settings);
    authentication, index limits and per-client write limits from :class:`SecuritySettings`;
    the RouteShare relay between replicas from :class:`RelaySettings`.
    """

    store: str = setting(
        "etcd", "Placement store: etcd (default, durable, shared by replicas) or memory "
        "(single process, tests and benchmarks only: state is lost on exit)")
    block_size: int = setting(16, "Tokens per KV block; nodes registering another size are refused")
    lease_ttl_s: int = setting(
        10, "Node lease TTL in seconds: a node without heartbeats for this long is removed")
    heartbeat_interval_s: float = setting(
        0.0, "Heartbeat interval suggested to agents (0 = lease_ttl_s / 3)")
    status_write_interval_s: float = setting(
        2.0, "Write a node's usage to etcd at most this often (other replicas see it that late)")
    snapshot_threshold: int = setting(
        64, "Compact a node's delta keys into snapshot keys once it has this many deltas "
        "(bounds keys per lease; higher = fewer snapshot rewrites = fewer etcd bytes)")
    snapshot_chunk_bytes: int = setting(
        1024 * 1024, "Maximum bytes of one snapshot key (at most 1 MiB)")
    max_message_bytes: int = setting(
        16 * 1024 * 1024, "Largest gRPC message the registry accepts or sends")
    max_hashes_per_call: int = setting(
        1_000_000, "Most block hashes one Heartbeat, Resync message or Lookup may carry")
    max_nodes: int = setting(4096, "Most nodes the registry indexes at once")
    replica_id: str = setting("", "Name of this replica in ListNodes (default: host:pid)")
    watch_queue_size: int = setting(
        10_000, "Events buffered per WatchNodes/WatchPlacement stream before it is cut off")

    def __post_init__(self) -> None:
        ServerSettings.__post_init__(self)
        EtcdSettings.__post_init__(self)
        SecuritySettings.__post_init__(self)
        RelaySettings.__post_init__(self)
        require(self.auth == "none" or bool(self.tls_ca_file or self.auth_tokens
                                               or self.auth_tokens_file), "auth",
                "'required' needs client certificates (--tls-ca-file with --tls-cert-file) or "
                "bearer tokens (--auth-tokens-file or --auth-tokens)")
        require(self.store in ("etcd", "memory"), "store", "must be etcd or memory")
        require(self.block_size >= 1, "block_size", "must be >= 1")
        require(self.lease_ttl_s >= 1, "lease_ttl_s", "must be >= 1 second")
        require(0 <= self.heartbeat_interval_s < self.lease_ttl_s, "heartbeat_interval_s",
                "must be >= 0 and below lease_ttl_s")
        require(self.status_write_interval_s >= 0, "status_write_interval_s", "must be >= 0")
        require(self.snapshot_threshold >= 1, "snapshot_threshold", "must be >= 1")
        require(1024 <= self.snapshot_chunk_bytes <= 1024 * 1024, "snapshot_chunk_bytes",
                "must be between 1 KiB and 1 MiB")
        require(self.max_message_bytes >= 64 * 1024, "max_message_bytes", "must be >= 64 KiB")
        require(self.max_hashes_per_call >= 1, "max_hashes_per_call", "must be >= 1")
        require(self.max_nodes >= 1, "max_nodes", "must be >= 1")
        require(self.watch_queue_size >= 16, "watch_queue_size", "must be >= 16")

    def etcd_settings(self) -> EtcdSettings:
        """The etcd client's settings (the ``etcd_*`` fields of this object)."""
        names = {f.name for f in dataclasses.fields(EtcdSettings)}
        return EtcdSettings(**{n: getattr(self, n) for n in names})

    @property
    def effective_heartbeat_interval_s(self) -> float:
        """Heartbeat interval told to agents."""
        return self.heartbeat_interval_s or self.lease_ttl_s / 3.0
