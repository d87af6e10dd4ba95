"""The router's registry-link log: the first failure at once, reminders at most every 30 s, and
a line when the link is back (issue 20: a wrong --registry used to log nothing for 30 s)."""

from __future__ import annotations

import logging

import pytest

from router_service.retry import LinkLog, LinkNeverUp


def test_first_failure_at_once_then_rate_limited_then_recovery(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    log = LinkLog("10.0.0.9:50051", "placement watch", every_s=30.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="router_service.retry")
    log.failed(LinkNeverUp("watch ended before its snapshot completed"))
    assert len(caplog.records) == 1
    first = caplog.records[0]
    assert first.levelno == logging.WARNING
    msg = first.getMessage()
    assert "cannot reach the registry at 10.0.0.9:50051 (--registry)" in msg
    assert "watch ended before its snapshot completed" in msg
    assert "has never answered" in msg and "NOT_SERVING" in msg
    for _ in range(20):  # quick retries: no flood
        now[0] += 1.0
        log.failed(TimeoutError())
    assert len(caplog.records) == 1
    now[0] += 10.0  # 30 s after the first line
    log.failed(TimeoutError())
    assert len(caplog.records) == 2
    assert "22 failed attempts" in caplog.records[1].getMessage()
    assert "--registry-timeout-s" in caplog.records[1].getMessage()
    log.up()
    assert "reachable again after 22 failed attempts" in caplog.records[2].getMessage()
    log.failed(LinkNeverUp("x"))  # after being up: degraded routing, said so
    assert "degrades to the last known nodes" in caplog.records[3].getMessage()
