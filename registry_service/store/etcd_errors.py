"""Errors of the etcd client, each carrying its gRPC status (re-exported by etcd_client)."""

from __future__ import annotations

from kvroute.errors import KvrouteError, NotFound, Unavailable


class EtcdUnavailable(Unavailable):
    """etcd did not answer (every endpoint, every retry) within the deadlines."""


class EtcdLeaseNotFound(NotFound):
    """The lease named in a put does not exist any more (expired or revoked)."""


class EtcdError(KvrouteError):
    """etcd rejected a request (permission denied, bad request...); retrying will not help."""


class WatchCompacted(Exception):
    """A watch's start revision was compacted away: list the prefix again and re-watch from
    the listed revision + 1."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted revisions up to {compact_revision}; re-list and "
                         f"re-watch")
        self.compact_revision = compact_revision
