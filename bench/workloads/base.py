"""The request and workload types every workload produces and every replay consumes."""

from __future__ import annotations

import dataclasses
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

    def spread_ticks(self, tick_s: float) -> Workload:
        """Requests that share one arrival time spread evenly over the next ``tick_s`` seconds
        (order kept). The Mooncake traces quantise arrivals to ~3 s ticks (up to 28 requests
        share one); real arrivals were spread over the tick, and several router replicas see
        a same-instant burst very differently from one router (none can know the others'
        simultaneous decisions)."""
        if tick_s <= 0 or not self.requests:
            return self
        out: list[TraceRequest] = []
        reqs = self.requests
        i = 0
        while i < len(reqs):
            j = i
            while j < len(reqs) and reqs[j].arrival_s == reqs[i].arrival_s:
                j += 1
            n = j - i
            for k, r in enumerate(reqs[i:j]):
                out.append(dataclasses.replace(r, arrival_s=r.arrival_s + tick_s * k / n))
            i = j
        out.sort(key=lambda r: r.arrival_s)
        meta = dict(self.meta)
        meta["arrival_spread_s"] = tick_s
        return Workload(f"{self.name}~{tick_s:g}s", self.block_size, out, self.source, meta)


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
