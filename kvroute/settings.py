"""Typed settings: dataclasses whose fields document themselves, read from flags and env.

Each component declares one frozen dataclass. Every field is made with :func:`setting`, which
records its help text (shown by ``--help``); :func:`add_arguments` turns a settings class into
argparse flags (``listen`` -> ``--listen``) and :func:`from_namespace` builds the object with the
precedence flag > ``KVROUTE_<FIELD>`` environment variable > default. Settings validate
themselves in ``__post_init__`` and raise :class:`kvroute.errors.ConfigError` with the field name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kvroute.errors import ConfigError

ENV_PREFIX = "KVROUTE_"
"""Prefix of every environment variable kvroute reads."""

T = TypeVar("T")
S = TypeVar("S")


def setting(default: Any, help: str, *, flag: str | None = None,
            old_names: tuple[str, ...] = (), metavar: str | None = None,
            choices: tuple[str, ...] | None = None) -> Any:
    """A settings field with its documentation (``help``) and optional flag name.

    ``old_names`` are former field names still read (as ``--old-name`` and ``KVROUTE_OLD_NAME``)
    after a rename, so existing command lines and deployments keep working. ``metavar`` and
    ``choices`` shape the flag :func:`add_value_arguments` makes (``metavar`` also the one of
    :func:`add_arguments`).
    """
    meta = {"help": help, "flag": flag, "old_names": old_names, "metavar": metavar,
            "choices": choices}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def env_name(field_name: str) -> str:
    """Environment variable of a field: ``etcd_endpoints`` -> ``KVROUTE_ETCD_ENDPOINTS``."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field: dataclasses.Field[Any]) -> str:
    """Command-line flag of a field: ``etcd_endpoints`` -> ``--etcd-endpoints``."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def settings_flags(obj: Any) -> tuple[str, ...]:
    """The command line that sets every field of the settings dataclass ``obj`` to its value
    (``--flag value``; a bool as ``--flag`` / ``--no-flag``): how a bench passes settings to the
    servers it starts."""
    flags: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool):
            flags.append(flag_name(f) if value else "--no-" + flag_name(f).removeprefix("--"))
        else:
            flags += [flag_name(f), str(value)]
    return tuple(flags)


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def _parse(tp: Any, raw: str, name: str) -> Any:
    base = _base_type(tp)
    origin = typing.get_origin(base)
    try:
        if base is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if origin in (tuple, list):
            (item,) = typing.get_args(base)[:1] or (str,)
            parts = [p.strip() for p in raw.split(",") if p.strip()]
            vals = [_parse(item, p, name) for p in parts]
            return tuple(vals) if origin is tuple else vals
        return raw
    except ValueError as exc:
        kind = getattr(base, "__name__", base)
        raise ConfigError(f"{name}: cannot read {raw!r} as {kind}") from exc


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one flag per field of the settings class ``cls`` to ``parser``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        default = _default(f)
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        help_text = f"{f.metadata.get('help', '')} [env {env_name(f.name)}; default: {shown!r}]"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        base = _base_type(hints[f.name])
        flags = [flag_name(f)] + ["--" + n.replace("_", "-") for n in _old_names(f)]
        if base is bool:
            parser.add_argument(
                *flags, dest=f.name, default=None, help=help_text,
                action=argparse.BooleanOptionalAction,
            )
        else:
            parser.add_argument(*flags, dest=f.name, default=None,
                                metavar=f.metadata.get("metavar") or "VALUE", help=help_text)


def _old_names(f: dataclasses.Field[Any]) -> tuple[str, ...]:
    return tuple(f.metadata.get("old_names", ()))


def _value_fields(cls: type[Any], prefix: str,
                  ) -> Iterator[tuple[dataclasses.Field[Any], str, str, Any, Any]]:
    """(field, flag, dest, default, base type) of each field made with :func:`setting`."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default, base = _default(f), _base_type(hints[f.name])
        turned_off = base is bool and default is True  # --no-FIELD stores False in FIELD
        flag = f.metadata.get("flag") or \
            f"--{'no-' if turned_off else ''}{prefix}{f.name}".replace("_", "-")
        dest = (prefix + f.name if turned_off else flag[2:]).replace("-", "_")
        yield f, flag, dest, default, base


def add_value_arguments(parser: Any, cls: type[Any], *, prefix: str = "") -> None:
    """One flag per field of ``cls`` made with :func:`setting` whose parsed value is the value
    itself, for benchmark CLIs that read ``args`` directly (no ``KVROUTE_*`` variables, unlike
    :func:`add_arguments`).

    The flag is the field's ``flag`` or ``--PREFIX-FIELD`` (``prefix="router-"``), its dest
    the flag's name (``--router-nodes`` -> ``router_nodes``); its type and default are the
    field's (a tuple field is a comma list: its default joined with commas, the caller splits
    it); a bool defaulting to False is ``store_true``, one defaulting to True a ``--no-PREFIX-
    FIELD`` that stores False in ``PREFIX_FIELD``. The help is the field's, as argparse reads it
    (``%(default)s`` shows the default; write ``%%`` for ``%``). Fields made without
    :func:`setting` get no flag.
    """
    for f, flag, dest, default, base in _value_fields(cls, prefix):
        kw: dict[str, Any] = {"dest": dest, "help": f.metadata["help"]}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if f.metadata.get("choices"):
            kw["choices"] = list(f.metadata["choices"])
        if base is bool:
            kw["action"] = "store_false" if default else "store_true"
        elif typing.get_origin(base) in (tuple, list):
            kw["default"] = ",".join(map(str, default))
        else:
            kw["default"] = default
            if base in (int, float):
                kw["type"] = base
        parser.add_argument(flag, **kw)


def value_arguments(cls: type[Any], args: argparse.Namespace, *,
                    prefix: str = "") -> dict[str, Any]:
    """The values :func:`add_value_arguments` flags parsed into ``args``, by field name (tuple
    fields still as the comma list given: the caller splits and checks them)."""
    return {f.name: getattr(args, dest) for f, _, dest, _, _ in _value_fields(cls, prefix)}


def from_namespace(
    cls: type[S],
    ns: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> S:
    """Build ``cls`` from flags in ``ns``, then ``KVROUTE_*`` variables, then defaults.

    Keyword ``overrides`` win over everything (used by tests and the demo).
    """
    env = os.environ if environ is None else environ
    hints = _hints(cls)
    values: dict[str, Any] = {}
    fields: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(cls)  # type: ignore[arg-type]
    for f in fields:
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        raw = getattr(ns, f.name, None) if ns is not None else None
        if isinstance(raw, bool):
            values[f.name] = raw
            continue
        for name in (f.name, *_old_names(f)):
            if raw is None:
                raw = env.get(env_name(name))
        if raw is not None:
            values[f.name] = _parse(hints[f.name], str(raw), flag_name(f))
    return cls(**values)


def describe(obj: Any) -> dict[str, Any]:
    """Field values of a settings object, for logs (secret-looking fields masked)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        if any(s in f.name for s in ("password", "token", "secret")) and val:
            val = "***"
        out[f.name] = val
    return out


def require(cond: bool, field: str, message: str) -> None:
    """Raise ConfigError naming ``field`` when ``cond`` is false."""
    if not cond:
        raise ConfigError(f"--{field.replace('_', '-')}: {message}")


def parse_hostport(value: str, field: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6), raising ConfigError naming ``field``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--{field.replace('_', '-')}: expected HOST:PORT, got {value!r}")
    port_n = int(port)
    if not 0 <= port_n <= 65535:
        raise ConfigError(f"--{field.replace('_', '-')}: port {port_n} out of range 0..65535")
    return host.strip("[]"), port_n


@dataclass(frozen=True)
class TLSSettings:
    """TLS material for a gRPC server or client (all paths to PEM files; empty = plaintext)."""

    cert_file: str = setting("", "PEM certificate of this process (server, or client for mTLS)")
    key_file: str = setting("", "PEM private key matching cert_file")
    ca_file: str = setting(
        "", "PEM CA bundle: servers require client certs signed by it (mTLS); clients verify "
        "the server with it")
    server_name: str = setting("", "Override of the TLS server name a client expects")
    token: str = setting("", "Bearer token a client sends on every call (with or without TLS)")
    token_file: str = setting(
        "", "File holding the bearer token a client sends (re-read when it changes)")

    @property
    def enabled(self) -> bool:
        """True when any TLS material is configured."""
        return bool(self.cert_file or self.ca_file)
