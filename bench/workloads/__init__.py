"""Workloads for ``kvroute bench``: Mooncake traces by path, and generated token workloads."""

from __future__ import annotations

from pathlib import Path

from bench.workloads.base import TraceRequest, Workload
from bench.workloads.generated import conversations, system_prompt
from bench.workloads.mooncake import MOONCAKE_BLOCK_SIZE, TraceFormatError, load_mooncake

SAMPLE_TRACE = Path(__file__).resolve().parent.parent / "data" / "conversation_trace_sample.jsonl"
"""The Mooncake sample shipped with kvroute (see bench/data/NOTICE)."""

WORKLOAD_NAMES = ("conversations", "system-prompt", "mooncake-sample")
"""Names accepted by ``--workload``."""


def load_workload(*, trace: str | None = None, workload: str | None = None, seed: int = 0,
                  start: int = 0, limit: int | None = None) -> Workload:
    """A trace by path, or a named workload; ``start``/``limit`` select requests."""
    if trace:
        return load_mooncake(trace, start=start, limit=limit)
    name = workload or "mooncake-sample"
    if name == "mooncake-sample":
        return load_mooncake(SAMPLE_TRACE, start=start, limit=limit)
    if name == "conversations":
        wl = conversations(seed)
    elif name == "system-prompt":
        wl = system_prompt(seed)
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)} "
                         "or give --trace PATH")
    return wl.slice(start, limit) if start or limit is not None else wl


__all__ = [
    "MOONCAKE_BLOCK_SIZE",
    "SAMPLE_TRACE",
    "WORKLOAD_NAMES",
    "TraceFormatError",
    "TraceRequest",
    "Workload",
    "conversations",
    "load_mooncake",
    "load_workload",
    "system_prompt",
]
