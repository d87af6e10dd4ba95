"""Settings of the etcd client (no etcd library imported here).

Its value types are in :mod:`.etcd_types`, its errors in :mod:`.etcd_errors`;
:mod:`registry_service.store.etcd_client` re-exports all three, so callers import from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.settings import parse_hostport, require, setting

MIB = 1024 * 1024


@dataclass(frozen=True)
class EtcdSettings:
    """How kvroute reaches etcd. Flags ``--etcd-*``, variables ``KVROUTE_ETCD_*``."""

    etcd_endpoints: tuple[str, ...] = setting(
        ("127.0.0.1:2379",),
        "etcd client endpoints HOST:PORT, comma separated; several = round-robin failover")
    etcd_prefix: str = setting("/kvroute/v1/", "Key prefix under which kvroute keeps its keys")
    etcd_ca_file: str = setting(
        "", "PEM CA bundle to verify etcd's server certificate (enables TLS to etcd)")
    etcd_cert_file: str = setting("", "PEM client certificate for etcd mTLS")
    etcd_key_file: str = setting("", "PEM client key for etcd mTLS")
    etcd_server_name: str = setting(
        "", "TLS server name to expect from etcd (override, when endpoints are IPs)")
    etcd_username: str = setting(
        "", "etcd user (enables authentication; the token is refreshed when it expires)")
    etcd_password: str = setting("", "Password of etcd_username")
    etcd_call_timeout_s: float = setting(3.0, "Deadline of every unary etcd call, in seconds")
    etcd_connect_timeout_s: float = setting(
        5.0, "How long connect() waits for an etcd endpoint to answer, in seconds")
    etcd_max_message_bytes: int = setting(
        64 * MIB, "gRPC message limit to etcd (prefix reads larger than this fail)")
    etcd_retry_attempts: int = setting(
        4, "Attempts per etcd call on transient errors (unavailable, deadline, expired token)")
    etcd_keepalive_s: float = setting(
        10.0, "gRPC keepalive ping interval to etcd; a silent etcd is noticed within ~2x this")

    def __post_init__(self) -> None:
        require(len(self.etcd_endpoints) > 0, "etcd_endpoints", "give at least one HOST:PORT")
        for ep in self.etcd_endpoints:
            parse_hostport(ep.removeprefix("http://").removeprefix("https://"),
                           "etcd_endpoints")
        require(self.etcd_prefix.endswith("/"), "etcd_prefix", "must end with '/'")
        require(bool(self.etcd_cert_file) == bool(self.etcd_key_file), "etcd_cert_file",
                "etcd cert and key must be given together")
        require(not self.etcd_password or bool(self.etcd_username), "etcd_password",
                "a password needs --etcd-username")
        require(self.etcd_call_timeout_s > 0, "etcd_call_timeout_s", "must be > 0")
        require(self.etcd_connect_timeout_s > 0, "etcd_connect_timeout_s", "must be > 0")
        require(self.etcd_max_message_bytes >= 4 * MIB, "etcd_max_message_bytes",
                "must be >= 4 MiB")
        require(1 <= self.etcd_retry_attempts <= 20, "etcd_retry_attempts", "must be 1..20")
        require(self.etcd_keepalive_s >= 5, "etcd_keepalive_s",
                "must be >= 5 (etcd rejects more frequent pings)")

    @property
    def tls_enabled(self) -> bool:
        """True when etcd is reached over TLS."""
        return bool(self.etcd_ca_file or self.etcd_cert_file)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Endpoints without any ``http(s)://`` scheme."""
        return tuple(ep.removeprefix("http://").removeprefix("https://")
                     for ep in self.etcd_endpoints)
