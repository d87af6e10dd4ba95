"""Settings of the RouteShare relay between registry replicas (issue 19).

A mixin of :class:`registry_service.settings.RegistrySettings` (flags and ``KVROUTE_*`` like
every other field). See :mod:`registry_service.share_relay` for what the relay does.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from kvroute.settings import TLSSettings, parse_hostport, require, setting


@dataclass(frozen=True)
class RelaySettings:
    """How this registry's RouteShare hub finds and reaches the other replicas' hubs."""

    share_relay: bool = setting(
        True, "Relay router replicas' RouteShare deltas between registry replicas, so every "
        "router hears every other whichever registry pod its stream landed on. Peers are found "
        "through etcd (needs --store etcd; a memory store has no peers). Off: routers on "
        "different registry replicas form separate sharing groups")
    share_relay_advertise: str = setting(
        "", "HOST:PORT the other registry replicas dial to reach this one (its own address, "
        "never a load-balanced Service: in Kubernetes the pod IP from the downward API). "
        "Default: --listen with its bound port, or this host's name when --listen is a "
        "wildcard address")
    share_relay_ttl_s: int = setting(
        10, "Lease TTL of this replica's hub record in etcd: a replica that dies stops being "
        "dialled this long after")
    share_relay_timeout_s: float = setting(
        5.0, "A relay link that hears nothing (not even a keepalive) for this long is "
        "reconnected; an inbound relay silent for this long is dropped")
    share_relay_retry_max_s: float = setting(
        2.0, "Longest wait between reconnect attempts to a peer hub (jittered back-off)")
    share_relay_queue: int = setting(
        100_000, "Deltas queued per peer hub while its link is slow; past it they are dropped "
        "and counted (the peer's routers then miss them)")
    share_relay_ca_file: str = setting(
        "", "PEM CA to verify peer registries with (default: --tls-ca-file); set it, or serve "
        "TLS, to dial peers over TLS")
    share_relay_cert_file: str = setting(
        "", "PEM client certificate presented to peer registries (default: --tls-cert-file; "
        "with --auth required its URI SAN names a registry:<name> or admin identity)")
    share_relay_key_file: str = setting(
        "", "PEM key of --share-relay-cert-file (default: --tls-key-file)")
    share_relay_server_name: str = setting(
        "", "TLS server name expected on peer registries' certificates (peers are dialled by "
        "address, e.g. a pod IP: set the name their certificate carries, e.g. the Service)")
    share_relay_token_file: str = setting(
        "", "File holding the bearer token sent to peer registries (with --auth required and "
        "no client certificates: a registry:<name> entry of the peers' --auth-tokens-file); "
        "re-read when it changes")
    share_relay_token: str = setting(
        "", "The relay bearer token itself (prefer --share-relay-token-file)")

    def __post_init__(self) -> None:
        if self.share_relay_advertise:
            parse_hostport(self.share_relay_advertise, "share_relay_advertise")
        require(self.share_relay_ttl_s >= 2, "share_relay_ttl_s", "must be >= 2 seconds")
        require(self.share_relay_timeout_s > 0, "share_relay_timeout_s", "must be > 0")
        require(self.share_relay_retry_max_s > 0, "share_relay_retry_max_s", "must be > 0")
        require(self.share_relay_queue >= 1, "share_relay_queue", "must be >= 1")
        require(bool(self.share_relay_cert_file) == bool(self.share_relay_key_file),
                "share_relay_cert_file", "relay cert and key must be given together")

    def relay_tls(self, server: TLSSettings) -> TLSSettings:
        """The relay client's TLS and token: its own fields, else the server's TLS files
        (the registry's certificate is then also its client certificate)."""
        return TLSSettings(
            cert_file=self.share_relay_cert_file or server.cert_file,
            key_file=self.share_relay_key_file or server.key_file,
            ca_file=self.share_relay_ca_file or server.ca_file,
            server_name=self.share_relay_server_name,
            token=self.share_relay_token, token_file=self.share_relay_token_file)

    def relay_advertise(self, listen: str, port: int) -> str:
        """The address peers dial: --share-relay-advertise, else --listen's host with the
        bound ``port`` (this host's name for a wildcard listen address)."""
        if self.share_relay_advertise:
            return self.share_relay_advertise
        host, _ = parse_hostport(listen, "listen")
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
