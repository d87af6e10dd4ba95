"""The request and workload types every workload produces and every replay consumes."""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload, already reduced to canonical block hashes."""

    request_id: str
    """Unique id within the workload."""
    arrival_s: float
    """Arrival time in seconds from the start of the workload."""
    block_hashes: tuple[int, ...]
    """Canonical prefix-chained block hashes, block 0 first."""
    prompt_tokens: int
    """Prompt length in tokens (a trailing partial block may or may not be hashed)."""
    output_tokens: int
    """Tokens to generate."""
    session_key: str | None = None
    """Conversation/session id when the workload has one (Mooncake traces have none)."""
    prompt_text_head: str = ""
    """The first characters of the prompt as text, for the seed notebook's policy (see README)."""

    def block_tokens(self, index: int, block_size: int) -> int:
        """Tokens of block ``index`` (the last hashed block may be partial)."""
        return max(0, min(block_size, self.prompt_tokens - index * block_size))

    def cached_tokens(self, matched_blocks: int, block_size: int) -> int:
        """Prompt tokens covered by the first ``matched_blocks`` blocks."""
        return min(matched_blocks * block_size, self.prompt_tokens)


@dataclass(frozen=True)
class Workload:
    """A named, time-ordered list of requests in one block size."""

    name: str
    """Short name (shown in tables and JSON)."""
    block_size: int
    """Tokens per block of ``block_hashes``."""
    requests: list[TraceRequest]
    """Requests sorted by arrival."""
    source: str = ""
    """Where it came from (path, generator and seed)."""
    meta: dict[str, object] = field(default_factory=dict)
    """Generator parameters, for the JSON report."""

    def distinct_blocks(self) -> int:
        """Number of distinct block hashes over all requests."""
        seen: set[int] = set()
        for r in self.requests:
            seen.update(r.block_hashes)
        return len(seen)

    def slice(self, start: int = 0, limit: int | None = None) -> Workload:
        """Requests ``start .. start+limit`` with arrivals shifted to start at 0."""
        end = None if limit is None else start + limit
        reqs = self.requests[start:end]
        if not reqs:
            return Workload(self.name, self.block_size, [], self.source, dict(self.meta))
        t0 = reqs[0].arrival_s
        shifted = [TraceRequest(r.request_id, r.arrival_s - t0, r.block_hashes, r.prompt_tokens,
                                r.output_tokens, r.session_key, r.prompt_text_head) for r in reqs]
        name = self.name if start == 0 and limit is None else \
            f"{self.name}[{start}:{start + len(reqs)}]"
        return Workload(name, self.block_size, shifted, self.source, dict(self.meta))

    def arrival_ticks(self) -> ArrivalTicks:
        """How the arrival times are quantised (:class:`ArrivalTicks`)."""
        times = [r.arrival_s for r in self.requests]
        distinct = sorted(set(times))
        gaps = sorted(b - a for a, b in itertools.pairwise(distinct))
        most = 0
        run = 0
        for k, t in enumerate(times):
            run = run + 1 if k and t == times[k - 1] else 1
            most = max(most, run)
        return ArrivalTicks(len(times), len(distinct), gaps[0] if gaps else 0.0,
                            gaps[len(gaps) // 2] if gaps else 0.0, most)

    def spread_ticks(self, tick_s: float, shape: str = "even", seed: int = 0) -> Workload:
        """Requests that share one arrival time spread over the next ``tick_s`` seconds.

        The Mooncake traces quantise arrivals to ~3 s ticks (up to 28 requests share one; see
        :meth:`arrival_ticks`); the real arrivals were spread over the tick, and several router
        replicas see a same-instant burst very differently from one router (none can know the
        others' simultaneous decisions). ``shape`` ``even``: evenly, in trace order;
        ``uniform``: each at a seeded uniform draw in the tick (what a Poisson process's
        arrivals look like given their count in the tick: some land close together), order
        by the draw. Every policy and router replayed on the result sees the same times.
        """
        if shape not in SPREAD_SHAPES:
            raise ValueError(f"arrival spread shape {shape!r}: one of {', '.join(SPREAD_SHAPES)}")
        if tick_s <= 0 or not self.requests:
            return self
        rnd = random.Random(f"arrival-spread:{seed}")
        out: list[TraceRequest] = []
        reqs = self.requests
        i = 0
        while i < len(reqs):
            j = i
            while j < len(reqs) and reqs[j].arrival_s == reqs[i].arrival_s:
                j += 1
            n = j - i
            for k, r in enumerate(reqs[i:j]):
                off = tick_s * k / n if shape == "even" else rnd.uniform(0.0, tick_s)
                out.append(dataclasses.replace(r, arrival_s=r.arrival_s + off))
            i = j
        out.sort(key=lambda r: r.arrival_s)
        meta = dict(self.meta)
        meta["arrival_spread_s"] = tick_s
        meta["arrival_spread_shape"] = shape
        meta["arrivals_before_spread"] = self.arrival_ticks().describe()
        tag = "" if shape == "even" else f"-{shape}"
        return Workload(f"{self.name}~{tick_s:g}s{tag}", self.block_size, out, self.source, meta)


SPREAD_SHAPES = ("even", "uniform")
"""How :meth:`Workload.spread_ticks` places a tick's requests."""


@dataclass(frozen=True)
class ArrivalTicks:
    """How a workload's arrival times are quantised."""

    requests: int
    distinct: int
    """Distinct arrival times."""
    min_gap_s: float
    """Smallest gap between two distinct arrival times."""
    median_gap_s: float
    """Median gap between consecutive distinct arrival times."""
    max_same: int
    """Most requests sharing one arrival time."""

    @property
    def quantised(self) -> bool:
        """True when arrivals sit on a grid of ticks of at least 0.5 s with several requests
        per tick (a trace's timestamps rounded, as the Mooncake traces' ~3 s ticks are)."""
        return self.min_gap_s >= 0.5 and self.max_same > 1 and self.requests >= 2 * self.distinct

    def describe(self) -> str:
        """One line for the report, e.g. ``quantised to ~3.0 s ticks: ...``."""
        if not self.quantised:
            return (f"{self.distinct} distinct arrival times for {self.requests} requests, up "
                    f"to {self.max_same} at one instant")
        return (f"quantised to ~{self.median_gap_s:.1f} s ticks: {self.distinct} distinct "
                f"arrival times for {self.requests} requests, up to {self.max_same} at one "
                f"instant")


def hash_ids_text(ids: tuple[int, ...] | list[int], chars: int = 50) -> str:
    """Decimal rendering of the first ids, space-separated, cut to ``chars`` characters."""
    out: list[str] = []
    n = 0
    for i in ids:
        s = str(i)
        out.append(s)
        n += len(s) + 1
        if n >= chars:
            break
    return " ".join(out)[:chars]
