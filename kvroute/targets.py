"""Several addresses of one service (the registry): parse, validate, rotate on failure.

Routers and agents take ``--registry`` as one ``HOST:PORT`` or a comma list of them. A host
name that resolves to several addresses (a Kubernetes headless Service) is one entry: gRPC's
DNS resolver returns every address and its ``pick_first`` policy moves to the next one when the
connected address fails. A list names replicas explicitly: the client uses one at a time and
moves to the next when a call or stream fails for connectivity reasons (:class:`TargetRing`).
Every entry is validated at start, so ``host1,host2`` (no ports) is a clear configuration error
rather than a channel that never connects.
"""

from __future__ import annotations

from kvroute.errors import ConfigError
from kvroute.settings import parse_hostport

SCHEMES = ("dns:///", "ipv4:", "ipv6:")
"""gRPC target prefixes accepted in front of HOST:PORT."""


def parse_targets(value: str, field: str) -> tuple[str, ...]:
    """The entries of a comma-separated address list, each checked as ``HOST:PORT``
    (optionally with a ``dns:///`` prefix); ConfigError naming ``field`` otherwise."""
    flag = f"--{field.replace('_', '-')}"
    entries = [e.strip() for e in value.split(",")]
    if not value.strip() or any(not e for e in entries):
        raise ConfigError(f"{flag}: expected HOST:PORT or a comma list HOST:PORT,HOST:PORT "
                          f"(no empty entries), got {value!r}")
    out: list[str] = []
    for entry in entries:
        bare = entry
        for scheme in SCHEMES:
            if bare.startswith(scheme):
                bare = bare[len(scheme):]
                break
        if "," in bare or "/" in bare:
            raise ConfigError(f"{flag}: {entry!r} is not HOST:PORT")
        try:
            parse_hostport(bare, field)
        except ConfigError as exc:
            raise ConfigError(f"{flag}: every address needs HOST:PORT; {entry!r} in {value!r} "
                              f"does not ({exc})") from None
        if entry in out:
            raise ConfigError(f"{flag}: {entry!r} is listed twice")
        out.append(entry)
    return tuple(out)


class TargetRing:
    """The addresses of one service; the client uses :attr:`current` and calls
    :meth:`advance` after a connectivity failure (a single address just stays)."""

    def __init__(self, targets: tuple[str, ...] | list[str] | str) -> None:
        if isinstance(targets, str):
            targets = parse_targets(targets, "registry")
        if not targets:
            raise ValueError("at least one target")
        self.targets = tuple(targets)
        self._i = 0
        self.switches = 0
        """How many times the client moved to another address."""

    @property
    def current(self) -> str:
        """The address in use."""
        return self.targets[self._i]

    def advance(self) -> str:
        """Move to the next address (wrapping around); returns it."""
        if len(self.targets) > 1:
            self._i = (self._i + 1) % len(self.targets)
            self.switches += 1
        return self.current

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self) -> str:
        """``a:1`` or ``a:1 (of a:1,b:2)`` for logs."""
        if len(self.targets) == 1:
            return self.current
        return f"{self.current} (of {','.join(self.targets)})"
