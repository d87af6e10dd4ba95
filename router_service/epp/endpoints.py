"""Node addresses <-> the ``ip:port`` endpoints of the endpoint picker protocol.

Agents advertise their engine as a URL (``--engine-url http://10.0.0.7:8000``); the protocol
speaks ``ip:port``. Envoy's ORIGINAL_DST cluster needs an IP literal, so in Kubernetes give the
agent the pod IP (downward API ``status.podIP``), not a DNS name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit


def endpoint_of(address: str) -> str:
    """``http://10.0.0.7:8000/v1`` -> ``10.0.0.7:8000``; ``10.0.0.7:8000`` stays as it is.

    IPv6 hosts keep their brackets (``[fd00::1]:8000``). Without a port, the scheme's default.
    """
    addr = address.strip()
    if "://" not in addr:
        addr = "http://" + addr
    parts = urlsplit(addr)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def is_ip_endpoint(endpoint: str) -> bool:
    """True when the host part is an IP literal (what ORIGINAL_DST can connect to)."""
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def join(endpoints: Iterable[str]) -> str:
    """The header / metadata value: ``ip:port,ip:port`` (duplicates dropped, order kept)."""
    seen: list[str] = []
    for e in endpoints:
        if e and e not in seen:
            seen.append(e)
    return ",".join(seen)
