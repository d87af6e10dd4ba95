"""Settings fields shared by every server: listen addresses, logging, TLS."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.settings import TLSSettings, parse_hostport, require, setting


@dataclass(frozen=True)
class ServerSettings:
    """Fields every kvroute server has. Component settings inherit from this."""

    listen: str = setting("127.0.0.1:0", "gRPC listen address HOST:PORT (port 0 = a free port)")
    metrics_listen: str = setting(
        "127.0.0.1:0", "Prometheus /metrics listen address HOST:PORT (port 0 = a free port)")
    log_format: str = setting("text", "Log format: text or json (one JSON object per line)")
    log_level: str = setting("info", "Log level: debug, info, warning or error")
    tls_cert_file: str = setting("", "PEM certificate of this server (empty = plaintext gRPC)")
    tls_key_file: str = setting("", "PEM private key of this server")
    tls_ca_file: str = setting(
        "", "PEM CA bundle; when set, clients must present a certificate signed by it (mTLS)")
    ready_file: str = setting(
        "", "Write the bound ports as JSON to this file once serving (for scripts and tests)")
    drain_timeout_s: float = setting(
        5.0, "On SIGTERM: seconds to let in-flight calls finish before exiting")

    def __post_init__(self) -> None:
        parse_hostport(self.listen, "listen")
        parse_hostport(self.metrics_listen, "metrics_listen")
        require(self.log_format in ("text", "json"), "log_format", "must be text or json")
        require(self.log_level.lower() in ("debug", "info", "warning", "error"), "log_level",
                "must be debug, info, warning or error")
        require(bool(self.tls_cert_file) == bool(self.tls_key_file), "tls_cert_file",
                "tls cert and key must be given together")
        require(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0")

    @property
    def server_tls(self) -> TLSSettings:
        """TLS settings of the gRPC server."""
        return TLSSettings(cert_file=self.tls_cert_file, key_file=self.tls_key_file,
                           ca_file=self.tls_ca_file)


@dataclass(frozen=True)
class ClientTLSSettings:
    """TLS fields of a gRPC client (to the registry or router)."""

    client_tls_ca_file: str = setting(
        "", "PEM CA bundle to verify the server with (enables TLS to the server)")
    client_tls_cert_file: str = setting("", "PEM client certificate for mTLS")
    client_tls_key_file: str = setting("", "PEM client key for mTLS")
    client_tls_server_name: str = setting("", "TLS server name to expect (override)")
    client_token_file: str = setting(
        "", "File holding a bearer token sent as 'authorization: Bearer <token>' on every call "
        "to the server (for a registry with --auth required and no client certificates); "
        "re-read when it changes, e.g. a mounted Kubernetes Secret")
    client_token: str = setting(
        "", "The bearer token itself (prefer --client-token-file: flags show in process lists)")

    @property
    def client_tls(self) -> TLSSettings:
        """TLS settings of the gRPC client."""
        return TLSSettings(cert_file=self.client_tls_cert_file, key_file=self.client_tls_key_file,
                           ca_file=self.client_tls_ca_file,
                           server_name=self.client_tls_server_name,
                           token=self.client_token, token_file=self.client_token_file)
