"""The registry's security settings: who may call what, index limits, per-client write limits.

A mixin of :class:`registry_service.settings.RegistrySettings` (flags and ``KVROUTE_*`` like
every other field). See ``registry_service/README.md`` "Security" for the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvroute.settings import require, setting

AUTH_MODES = ("none", "required")
ROLES = ("agent", "reader", "admin", "registry")


@dataclass(frozen=True)
class SecuritySettings:
    """Authentication, authorisation and resource limits of the registry."""

    auth: str = setting(
        "none", "Caller authentication: 'required' (every Registry call needs a client "
        "certificate with a spiffe://<trust domain>/<role>/<name> URI SAN, or a bearer token "
        "from --auth-tokens/--auth-tokens-file) or 'none' (plaintext demo/test mode: anyone may "
        "write any node; logged as a warning at start)")
    auth_tokens_file: str = setting(
        "", "File of bearer tokens, one per line: 'ROLE:NAME TOKEN' or 'ROLE:NAME sha256:HEX' "
        "(ROLE agent, reader, admin or registry; for an agent NAME is its node id). Re-read "
        "when it changes (Kubernetes Secret volume); '#' starts a comment")
    auth_tokens: tuple[str, ...] = setting(
        (), "Bearer tokens given inline as ROLE:NAME=TOKEN,... (prefer --auth-tokens-file: "
        "flags are visible in process listings)")
    auth_trust_domain: str = setting(
        "kvroute", "Trust domain of client certificates: a certificate names its identity "
        "with the URI SAN spiffe://<trust domain>/<role>/<name>")
    max_blocks_per_node: int = setting(
        2_000_000, "Most blocks one node may have indexed, whatever capacity it registers "
        "(a larger capacity_blocks is refused); bounds memory per node (~81 B per block)")
    max_index_entries: int = setting(
        20_000_000, "Most (block, node) entries in the whole index; a write past it is refused "
        "with RESOURCE_EXHAUSTED (~81 B per entry: 20M ~ 1.6 GB)")
    capacity_slack: float = setting(
        0.1, "A node may index capacity_blocks x (1 + this) blocks (or capacity_blocks + "
        "--capacity-slack-blocks, whichever is more): room for deltas in flight")
    capacity_slack_blocks: int = setting(
        4096, "Minimum slack over capacity_blocks, in blocks (see --capacity-slack)")
    client_write_calls_per_s: float = setting(
        50.0, "Write calls (RegisterNode, Heartbeat, Resync, DeregisterNode) per second one "
        "client may make; more get RESOURCE_EXHAUSTED before their message is decoded. A "
        "client is its identity (auth required), or its connection and the node it writes "
        "(auth none)")
    client_write_burst: int = setting(
        100, "Write calls a client may make at once above --client-write-calls-per-s")
    client_write_bytes_per_s: int = setting(
        4 * 1024 * 1024, "Bytes of write messages per second one client may send (one "
        "message larger than what is left is still admitted when the client is not in debt, "
        "so a full Resync passes; the client then waits it off)")
    client_refused_bytes_per_s: int = setting(
        1024 * 1024, "A write message over 64 KiB that the registry refuses from its raw "
        "bytes, before decoding (over a block limit, for an unknown node, not authorised), is "
        "answered after its bytes' time at this rate (at most 3 s, x0.8-1.0 jitter): a client "
        "sending such writes one after another makes the registry receive at most this many "
        "bytes per second of them. Clients should give writes a deadline over 3 s (the node "
        "agent's --rpc-timeout-s, default 5 s)")

    memory_trim_after_bytes: int = setting(
        64 * 1024 * 1024, "Return freed heap memory to the OS (glibc malloc_trim) once this "
        "many bytes of write messages were received or index entries dropped (0 = never); "
        "without it a burst of large messages leaves RSS high though nothing is alive")

    def __post_init__(self) -> None:
        require(self.auth in AUTH_MODES, "auth", f"must be one of {', '.join(AUTH_MODES)}")
        require(bool(self.auth_trust_domain) and "/" not in self.auth_trust_domain,
                "auth_trust_domain", "must be a non-empty name without '/'")
        for item in self.auth_tokens:
            ident, sep, token = item.partition("=")
            require(bool(sep and token), "auth_tokens", "expected ROLE:NAME=TOKEN entries")
            require(ident.partition(":")[0] in ROLES and bool(ident.partition(":")[2]),
                    "auth_tokens", f"identity {ident!r}: expected ROLE:NAME with ROLE one of "
                    f"{', '.join(ROLES)}")
        require(self.max_blocks_per_node >= 1, "max_blocks_per_node", "must be >= 1")
        require(self.max_index_entries >= 1, "max_index_entries", "must be >= 1")
        require(self.capacity_slack >= 0, "capacity_slack", "must be >= 0")
        require(self.capacity_slack_blocks >= 0, "capacity_slack_blocks", "must be >= 0")
        require(self.client_write_calls_per_s > 0, "client_write_calls_per_s", "must be > 0")
        require(self.client_write_burst >= 1, "client_write_burst", "must be >= 1")
        require(self.memory_trim_after_bytes >= 0, "memory_trim_after_bytes", "must be >= 0")
        require(self.client_write_bytes_per_s >= 1024, "client_write_bytes_per_s",
                "must be >= 1024")
        require(self.client_refused_bytes_per_s >= 1024, "client_refused_bytes_per_s",
                "must be >= 1024")

    def node_block_limit(self, capacity_blocks: int) -> int:
        """Most blocks a node of this capacity may have indexed (capacity plus slack)."""
        slack = max(math.ceil(capacity_blocks * self.capacity_slack), self.capacity_slack_blocks)
        return min(self.max_blocks_per_node, capacity_blocks + slack)
