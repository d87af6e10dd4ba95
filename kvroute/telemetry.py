"""Prometheus ``/metrics`` on a port of its own, and JSON-or-text logging with request ids.

Each server owns one :class:`prometheus_client.CollectorRegistry` (no global default registry),
creates its metrics on it with the ``kvroute_`` prefix, base units and ``_total`` counters, and
starts :class:`MetricsServer` on ``--metrics-listen``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("kvroute_request_id", default="")
"""Request id of the call being served; included in every log line made while serving it."""

METRIC_PREFIX = "kvroute_"
"""Prefix of every metric kvroute exports."""


class MetricsServer:
    """Serves one registry's metrics over HTTP at ``/metrics`` on ``host:port`` (port 0 = free)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Start serving in a daemon thread; returns the bound port."""
        server, thread = start_http_server(self._port, addr=self._host, registry=self._registry)
        self._server, self._thread = server, thread
        return int(server.server_port)

    @property
    def port(self) -> int:
        """Bound port (after start)."""
        return int(self._server.server_port) if self._server else self._port

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, and any ``extra`` fields."""

    _SKIP = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
        "message", "request_id", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            out["request_id"] = rid
        for key, val in record.__dict__.items():
            if key not in self._SKIP:
                out[key] = val
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the request id when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "")
        record.rid = f" [{rid}]" if rid else ""
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}"


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Configure the root logger once per process: ``fmt`` is ``json`` or ``text``."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
