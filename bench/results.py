"""What one policy's replay produced, per request and per node (sim and stack fill the same)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PolicyRun:
    """Raw outcome of replaying a workload under one policy; metrics come from here."""

    policy: str
    """Policy name (``peer:<router>:<policy>`` for real peer routers)."""
    node_ids: list[str]
    """Nodes of the fleet, in index order."""
    n_requests: int
    """Requests in the workload."""
    node: list[int] = field(default_factory=list)
    """Per request: index of the node that served it (-1 = failed)."""
    arrival_s: list[float] = field(default_factory=list)
    """Per request: arrival time."""
    ttft_s: list[float] = field(default_factory=list)
    """Per request: time to first token (NaN when failed)."""
    e2e_s: list[float] = field(default_factory=list)
    """Per request: arrival to last token (NaN when failed)."""
    prompt_tokens: list[int] = field(default_factory=list)
    """Per request: prompt length."""
    cached_tokens: list[int] = field(default_factory=list)
    """Per request: prompt tokens the engine's cache served when its prefill started."""
    predicted_cached_tokens: list[int] = field(default_factory=list)
    """Per request: cached tokens the router expected (registry belief at routing time)."""
    busy_s: list[float] = field(default_factory=list)
    """Per node: seconds spent prefilling."""
    evictions: int = 0
    """Blocks evicted by all engines."""
    failed: int = 0
    """Requests that could not be routed or served."""
    t_end_s: float = 0.0
    """Time of the last completion."""
    load_samples: list[tuple[float, list[int]]] = field(default_factory=list)
    """(time, in-flight requests per node) sampled during the replay."""
    wall_s: float = 0.0
    """Wall-clock seconds the replay took."""
    notes: list[str] = field(default_factory=list)
    """Anything a reader of the numbers should know about this run."""
    arrival_lag_s: list[float] = field(default_factory=list)
    """Stack runs, per request: how much later than its schedule the request reached its
    engine (model seconds; each engine's least-late request = 0). Large values mean the replay
    could not keep the trace's timing (CPU contention); empty in --mode sim."""
    arrival_lag_by_request: list[float] = field(default_factory=list)
    """Stack runs: ``arrival_lag_s`` in request order, NaN for a request no engine recorded
    (what :mod:`bench.agreement` replays in the sim); empty in --mode sim."""
    return_lag_s: list[float] = field(default_factory=list)
    """Stack runs, per request: how much later than its engine finished the client had the
    response (model seconds; the router hears ``Complete`` just after). ``--mode sim`` models
    it as ``complete_lag_s``; empty in --mode sim. Disaggregated (``stack-pd:``) rows place
    the engine's answer via the arrival lag, which is relative to each engine's earliest, so
    their lag also holds that engine's minimum arrival lag: an upper bound by about one
    ``Route`` RTT."""
    return_lag_by_request: list[float] = field(default_factory=list)
    """Stack runs: ``return_lag_s`` in request order, NaN where not measured (what
    :mod:`bench.agreement` replays per request); empty in --mode sim."""
    load_avg: tuple[float, float] | None = None
    """The machine's 1-minute load average when the replay started and ended."""
    cpu_busy: float | None = None
    """Fraction of the machine's CPU time busy during the replay (all processes, all cores;
    from /proc/stat; None where unavailable)."""
    route_front: list[int] = field(default_factory=list)
    """Stack Router API runs, per request: the router replica its Route went to (-1: none);
    empty elsewhere."""
    route_sent_wall_s: list[float] = field(default_factory=list)
    """Stack Router API runs, per request: wall seconds after the replay's start the client
    sent the Route (client clock); empty elsewhere."""
    route_answered_wall_s: list[float] = field(default_factory=list)
    """Stack Router API runs, per request: wall seconds after the replay's start the client
    had the Route's answer (NaN: failed); empty elsewhere."""
    replica_view: dict[str, Any] | None = None
    """Stack runs over N router replicas: their shared view's staleness and the spacing of
    their decisions in the workload's bursts (:func:`bench.replica_view.burst_spacing`)."""

    def init_requests(self, n: int) -> None:
        """Allocate the per-request arrays for ``n`` requests."""
        nan = float("nan")
        self.node = [-1] * n
        self.arrival_s = [0.0] * n
        self.ttft_s = [nan] * n
        self.e2e_s = [nan] * n
        self.prompt_tokens = [0] * n
        self.cached_tokens = [0] * n
        self.predicted_cached_tokens = [0] * n
