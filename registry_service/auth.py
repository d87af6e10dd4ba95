"""Who is calling the registry, and what they may do.

Identities are ``ROLE:NAME``:

- ``agent:<node_id>`` may RegisterNode, Heartbeat, Resync and DeregisterNode for that node only;
- ``reader:<name>`` (routers, gateways, endpoint pickers, the CLI) may Lookup, LookupStream,
  ListNodes, WatchNodes and WatchPlacement, and join RouteShare.Exchange (the router replicas'
  shared view of load);
- ``admin:<name>`` may do everything (drain any node, for operators);
- ``registry:<name>`` (a peer registry replica) may only join RouteShare.Exchange, and is the
  only identity besides admin that may join it as a relay hub (issue 19).

An identity comes from the client certificate (mTLS: the URI SAN
``spiffe://<trust domain>/<role>/<name>``) or from a bearer token (``authorization: Bearer T``
metadata) listed in ``--auth-tokens-file`` / ``--auth-tokens``. With ``--auth none`` every
caller is ``anonymous`` and may do everything (demo and tests only).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from kvroute.errors import PermissionDenied, Unauthenticated
from registry_service.security_settings import ROLES, SecuritySettings

log = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"RegisterNode", "Heartbeat", "Resync", "DeregisterNode"})
READ_METHODS = frozenset({"Lookup", "LookupStream", "ListNodes", "WatchNodes",
                          "WatchPlacement", "Exchange"})
"""("Exchange" is RouteShare.Exchange: router replicas' shared view of load, issue 19.)"""
TOKEN_RELOAD_S = 1.0
"""The tokens file is checked for changes at most this often."""


@dataclass(frozen=True)
class Identity:
    """A caller: role (agent, reader, admin, anonymous), name, and where it came from."""

    role: str
    name: str
    source: str

    def __str__(self) -> str:
        return f"{self.role}:{self.name} (from {self.source})"

    def allowed(self) -> str:
        """What this identity may do, for error messages."""
        if self.role == "agent":
            return (f"it may only call {', '.join(sorted(WRITE_METHODS))} for node "
                    f"{self.name!r}")
        if self.role == "reader":
            return f"it may only call {', '.join(sorted(READ_METHODS))}"
        if self.role == "registry":
            return "it may only call RouteShare.Exchange (as a relay hub)"
        return "it may call every method"


ANONYMOUS = Identity("anonymous", "-", "auth none")
CALLER: ContextVar[Identity] = ContextVar("kvroute_registry_caller", default=ANONYMOUS)
"""The identity of the call being served (set by the auth interceptor)."""


def token_digest(token: str) -> str:
    """Hex SHA-256 of a token (what the tokens file may hold instead of the token)."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_identity(text: str, source: str) -> Identity:
    """``ROLE:NAME`` as an Identity; ValueError when malformed."""
    role, sep, name = text.strip().partition(":")
    if not sep or role not in ROLES or not name:
        raise ValueError(f"identity {text!r}: expected ROLE:NAME with ROLE one of "
                         f"{', '.join(ROLES)}")
    return Identity(role, name, source)


class TokenTable:
    """Bearer tokens (stored as SHA-256 digests) -> identity; re-reads its file on change."""

    def __init__(self, inline: Sequence[str], path: str) -> None:
        self._inline: dict[str, Identity] = {}
        for item in inline:
            ident, _, token = item.partition("=")
            self._inline[token_digest(token)] = parse_identity(ident, "token")
        self._path = path
        self._file: dict[str, Identity] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        if path:
            self._load(force=True)

    def __len__(self) -> int:
        return len(self._inline) + len(self._file)

    def _load(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < TOKEN_RELOAD_S:
            return
        self._checked = now
        try:
            mtime = os.stat(self._path).st_mtime
        except OSError as exc:
            if force:
                raise
            log.warning("auth tokens file %s unreadable (%s): keeping the last tokens",
                        self._path, exc)
            return
        if mtime == self._mtime:
            return
        with open(self._path, encoding="utf-8") as fh:
            self._file = parse_tokens_file(fh.read().splitlines(), self._path)
        self._mtime = mtime
        log.info("auth tokens file %s: %d tokens", self._path, len(self._file))

    def lookup(self, token: str) -> Identity | None:
        """The identity of ``token``, or None."""
        if self._path:
            try:
                self._load()
            except ValueError as exc:  # a broken edit: keep the previous table
                log.error("auth tokens file %s: %s (keeping the last good tokens)",
                          self._path, exc)
        digest = token_digest(token)
        for table in (self._inline, self._file):
            for known, ident in table.items():
                if hmac.compare_digest(known, digest):
                    return ident
        return None


def parse_tokens_file(lines: Iterable[str], name: str) -> dict[str, Identity]:
    """``ROLE:NAME TOKEN`` / ``ROLE:NAME sha256:HEX`` lines as digest -> identity."""
    out: dict[str, Identity] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{name}:{n}: expected 'ROLE:NAME TOKEN'")
        ident = parse_identity(parts[0], "token")
        secret = parts[1]
        digest = (secret.removeprefix("sha256:").lower() if secret.startswith("sha256:")
                  else token_digest(secret))
        if len(digest) != 64:
            raise ValueError(f"{name}:{n}: a sha256: digest has 64 hex digits")
        out[digest] = ident
    return out


class Authenticator:
    """Turns a call's certificate or token into an Identity and checks what it may do."""

    def __init__(self, settings: SecuritySettings) -> None:
        self.required = settings.auth == "required"
        self.spiffe_prefix = f"spiffe://{settings.auth_trust_domain}/"
        self.tokens = TokenTable(settings.auth_tokens, settings.auth_tokens_file)

    def identify(self, metadata: Mapping[str, str], auth_context: Mapping[str, Iterable[bytes]],
                 ) -> Identity:
        """The caller's identity; UNAUTHENTICATED when auth is required and none is valid."""
        if not self.required:
            return ANONYMOUS
        header = metadata.get("authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            ident = self.tokens.lookup(token.strip())
            if ident is None:
                raise Unauthenticated(
                    "the bearer token is not known to this registry (check the token file "
                    "the client reads and --auth-tokens-file here)")
            return ident
        uris = [u.decode(errors="replace") for u in auth_context.get("peer_uri", ())]
        for uri in uris:
            if uri.startswith(self.spiffe_prefix):
                rest = uri[len(self.spiffe_prefix):]
                role, _, name = rest.partition("/")
                if role in ROLES and name and "/" not in name:
                    return Identity(role, name, "client certificate")
        if list(auth_context.get("x509_pem_cert", ())):
            raise Unauthenticated(
                f"the client certificate carries no identity: expected a URI SAN "
                f"{self.spiffe_prefix}<agent|reader|admin|registry>/<name>, saw "
                f"{uris or 'no URI SAN'}")
        raise Unauthenticated(
            "this registry requires credentials: a client certificate (mTLS) with a URI SAN "
            f"{self.spiffe_prefix}<role>/<name>, or 'authorization: Bearer <token>' metadata")

    @staticmethod
    def authorize(ident: Identity, method: str, node_id: str | None = None) -> None:
        """PERMISSION_DENIED unless ``ident`` may call ``method`` (for ``node_id``)."""
        if ident.role in ("admin", "anonymous"):
            return
        if ident.role == "registry":
            if method == "Exchange":
                return
            raise PermissionDenied(f"{method} refused: caller is {ident}; {ident.allowed()}")
        if method in READ_METHODS:
            if ident.role == "reader":
                return
            raise PermissionDenied(f"{method} refused: caller is {ident}; {ident.allowed()}")
        if method in WRITE_METHODS:
            if ident.role != "agent":
                raise PermissionDenied(
                    f"{method} refused: caller is {ident}; {ident.allowed()} (writes need an "
                    "agent identity for the node, or admin)")
            if node_id is not None and node_id != ident.name:
                raise PermissionDenied(
                    f"{method} for node {node_id!r} refused: caller is {ident}; "
                    f"{ident.allowed()}")
            return
        raise PermissionDenied(f"{method} refused: caller is {ident}; unknown method")
