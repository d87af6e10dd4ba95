"""Flags shared by the client commands (nodes, route, complete, stats, health).

Every client flag is also a ``KVROUTE_<DEST>`` variable (``--router`` -> ``KVROUTE_ROUTER``,
``--tls-ca-file`` -> ``KVROUTE_TLS_CA_FILE``): :func:`env_defaults` turns the variables into
defaults once a command's parser is complete, so a flag on the command line still wins. The
TLS variables are the ones a TLS server pod already has, so ``kvroute health`` exec'd inside
the pod presents the pod's certificate and verifies the server with the pod's CA, as the TLS
probe needs. Flags of a mutually exclusive group (``route``'s prompt source) are not read
from the environment: what to route is always given on the command line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from kvroute.errors import ConfigError
from kvroute.settings import ENV_PREFIX, TLSSettings, parse_hostport

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def add_target(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    """A required ``--router``/``--registry``/``--server`` HOST:PORT flag."""
    p.add_argument(flag, required=True, metavar="HOST:PORT",
                   help=f"{what} gRPC address (the port is required)")


def add_connection(p: argparse.ArgumentParser, timeout_s: float = 5.0) -> None:
    """``--timeout`` and the client TLS flags."""
    p.add_argument("--timeout", type=float, default=timeout_s, metavar="S",
                   help="deadline of each call in seconds")
    p.add_argument("--tls-ca-file", default="", metavar="PEM",
                   help="CA bundle to verify the server with (turns TLS on)")
    p.add_argument("--tls-cert-file", default="", metavar="PEM",
                   help="client certificate, for servers that require mTLS")
    p.add_argument("--tls-key-file", default="", metavar="PEM",
                   help="private key of --tls-cert-file")
    p.add_argument("--tls-server-name", default="", metavar="NAME",
                   help="name the server certificate must carry, when it differs from HOST "
                        "(e.g. kvroute-router when connecting to 127.0.0.1)")
    p.add_argument("--token-file", default="", metavar="FILE",
                   help="file holding a bearer token sent with every call (a registry with "
                        "--auth required and no client certificates: a reader token)")


def env_name(dest: str) -> str:
    """Variable of a client flag's destination: ``tls_ca_file`` -> ``KVROUTE_TLS_CA_FILE``."""
    return ENV_PREFIX + dest.upper()


def env_defaults(p: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Make every optional flag of ``p`` default to its ``KVROUTE_*`` variable, if set.

    A required flag whose variable is set stops being required. Each flag's help names its
    variable. Call after every flag of ``p`` has been added.
    """
    env = os.environ if environ is None else environ
    grouped = {id(a) for g in p._mutually_exclusive_groups for a in g._group_actions}
    for action in p._actions:
        if not action.option_strings or action.dest in ("help", argparse.SUPPRESS):
            continue
        if id(action) in grouped:
            continue
        name = env_name(action.dest)
        action.help = f"{action.help or ''} [env {name}]"
        raw = env.get(name)
        if raw is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            low = raw.strip().lower()
            if low not in _TRUE + _FALSE:
                raise ConfigError(f"{name}: expected true or false, got {raw!r}")
            action.default = low in _TRUE
        else:
            if callable(action.type):
                try:
                    action.type(raw)
                except ValueError:
                    kind = getattr(action.type, "__name__", "value")
                    raise ConfigError(f"{name}: cannot read {raw!r} as {kind}") from None
            action.default = raw  # argparse converts string defaults with the flag's type
        action.required = False


def target(value: str, flag: str) -> str:
    """Validate HOST:PORT (a missing port is an error, never a silent 443)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        example = f"{value.strip('[]') or 'HOST'}:{_EXAMPLE_PORTS.get(flag, 50051)}"
        raise ConfigError(f"{flag}: expected HOST:PORT, got {value!r}: the port is required "
                          f"(e.g. {example}); without one gRPC would silently use port 443")
    parse_hostport(value, flag.lstrip("-").replace("-", "_"))
    return value


_EXAMPLE_PORTS = {"--router": 50052, "--registry": 50051}


def tls(args: argparse.Namespace) -> TLSSettings:
    """Client TLS material from the flags (plaintext when none is given)."""
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        raise ConfigError("--tls-cert-file and --tls-key-file must be given together")
    for flag in ("tls_ca_file", "tls_cert_file", "tls_key_file", "token_file"):
        path = getattr(args, flag, "")
        if path and not os.path.isfile(path):
            raise ConfigError(f"--{flag.replace('_', '-')}: no such file: {path}")
    return TLSSettings(cert_file=args.tls_cert_file, key_file=args.tls_key_file,
                       ca_file=args.tls_ca_file, server_name=args.tls_server_name,
                       token_file=getattr(args, "token_file", ""))
