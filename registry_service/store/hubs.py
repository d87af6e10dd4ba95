"""The hub directory: how registry replicas find one another's RouteShare hubs (issue 19).

Each registry replica advertises its hub (instance id, replica name, the address peers dial)
under a lease of its own, so a replica that dies drops out of the directory within the lease
TTL with no cleanup code, exactly like a node record. Every replica follows the directory and
keeps one relay link to each other hub (:mod:`registry_service.share_relay`).

The etcd implementation is :class:`registry_service.store.etcd_hubs.EtcdHubDirectory`
(``P hubs/<hub_id>``); a store without one (the in-process memory store) has no peers.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HubRecord:
    """One registry replica's RouteShare hub, as advertised to the others."""

    hub_id: str
    """Instance id, unique per registry process (a restarted replica gets a new one)."""
    replica_id: str
    """The replica's name (``--replica-id``: the pod name in Kubernetes), for logs."""
    address: str
    """HOST:PORT the other replicas dial (``--share-relay-advertise``)."""
    started_unix_ms: int = 0
    """When the replica started advertising."""

    def encode(self) -> bytes:
        """The stored value (JSON)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> HubRecord:
        """Inverse of :meth:`encode`; ValueError when malformed."""
        try:
            raw = json.loads(data)
            rec = cls(**{k: raw[k] for k in ("hub_id", "replica_id", "address")},
                      started_unix_ms=int(raw.get("started_unix_ms", 0)))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a hub record: {exc}") from exc
        if not (rec.hub_id and rec.address):
            raise ValueError("not a hub record: hub_id and address are required")
        return rec


class HubDirectory(abc.ABC):
    """Advertise this replica's hub and follow everyone's."""

    @abc.abstractmethod
    async def advertise(self, record: HubRecord, ttl_s: int) -> None:
        """Keep ``record`` advertised under a lease of ``ttl_s`` seconds, in the background,
        until :meth:`withdraw` (re-advertised when the lease is lost, e.g. a long etcd outage).
        Returns at once; failures are logged and retried."""

    @abc.abstractmethod
    async def withdraw(self) -> None:
        """Stop advertising and delete the record now (peers stop relaying at once)."""

    @abc.abstractmethod
    def follow(self) -> AsyncIterator[dict[str, HubRecord]]:
        """Every advertised hub by id: the current set first, then again after each change.
        Runs until cancelled (store failures are retried)."""
