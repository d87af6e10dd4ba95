"""Latency model and scheduler of the simulated engine: pure, clock-free, reusable by the bench.

The caller owns time: it passes ``now`` (model seconds) to :meth:`EngineModel.submit`,
:meth:`EngineModel.advance` and :meth:`EngineModel.abort`, and asks
:meth:`EngineModel.next_event_time` when to call ``advance`` next. The HTTP server maps model time
to the wall clock through ``time_scale``; the in-process bench can drive it with a virtual clock.

The model:

- A FIFO queue; at most ``max_running`` requests admitted at once, and only when the KV cache can
  hold the whole sequence (prompt + output blocks). Strict FIFO: a head that does not fit blocks
  the queue, as vLLM's FCFS scheduler does.
- On admission the request's blocks are allocated in the cache (prefix reuse, evictions, stored
  events) and its prefill is queued on the one prefill unit: prefill takes
  ``uncached_tokens / prefill_tokens_per_s``, prefills run one after another.
- The first output token comes at the end of the prefill; each further token takes
  ``decode_s_per_token`` (decoding requests run in parallel, up to the batch limit).
- At the end the request's blocks are released (they stay cached, evictable) and queued
  requests are admitted at that instant.
- Mixed-batch interference (``mixed_batch_slowdown``, default 0 = off): a prefill is
  lengthened by that fraction per request decoding on the engine when it starts.
- Disaggregated serving: a request marked ``remote_kv`` (its prompt was prefilled on a prefill
  engine) does not use the prefill unit: on admission the blocks this engine's cache lacks are
  *received* (stored in the cache like computed ones, so they are published as BlockStored,
  as vLLM's KV connectors do), taking ``transfer_s_per_block`` each; the first token follows.
  A prefill engine runs requests with ``max_tokens=1`` (its first token ends the request and
  the KV is handed over).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine_sim.cache import Allocation, BlockId, KVCache
from engine_sim.params import EngineParams


class RequestTooLarge(ValueError):
    """The request can never fit in the KV cache."""


@dataclass(eq=False, slots=True)
class SimRequest:
    """One request: its input, and the times and cache result the model filled in.

    ``token_ids`` may be None when the prompt is known only by its full blocks' ids
    (``block_hashes``) and its length ``num_prompt_tokens`` — the in-process bench's form
    (:meth:`from_blocks`); otherwise ``num_prompt_tokens`` is ``len(token_ids)``.
    """

    request_id: str
    token_ids: list[int] | None
    block_hashes: Sequence[BlockId]
    max_tokens: int
    client_request_id: str = ""
    num_prompt_tokens: int = -1
    arrival: float = 0.0
    admitted_at: float | None = None
    prefill_start: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    cached_tokens: int = 0
    aborted: bool = False
    alloc: Allocation | None = field(default=None, repr=False)
    remote_kv: bool = False
    """The prompt's KV was computed by a prefill engine: receive it instead of prefilling."""
    transfer_blocks: int = 0
    """Blocks received from the prefill engine (``remote_kv`` only)."""
    transfer_s: float = 0.0
    """Seconds spent receiving them."""
    kv_wait_s: float = 0.0
    """SGLang-style decode half: seconds it waited for its prefill before queueing here."""

    def __post_init__(self) -> None:
        if self.token_ids is not None:
            self.num_prompt_tokens = len(self.token_ids)
        elif self.num_prompt_tokens < 1:
            raise ValueError("a request without token_ids needs num_prompt_tokens >= 1")

    @classmethod
    def from_blocks(cls, request_id: str, block_ids: Sequence[BlockId], prompt_tokens: int,
                    max_tokens: int) -> SimRequest:
        """A request known by its full blocks' ids (e.g. a trace's hash ids) and its length."""
        return cls(request_id, None, block_ids, max_tokens, num_prompt_tokens=prompt_tokens)

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return self.num_prompt_tokens

    @property
    def ttft(self) -> float | None:
        """Time to first token (``first_token_at - arrival``), once admitted."""
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def uncached_tokens(self) -> int:
        """Prompt tokens the prefill computes."""
        return self.prompt_tokens - self.cached_tokens


@dataclass
class StepResult:
    """What changed in one call: requests admitted (times now known) and requests finished."""

    admitted: list[SimRequest] = field(default_factory=list)
    finished: list[SimRequest] = field(default_factory=list)


class EngineModel:
    """Scheduler + latency model over a :class:`KVCache`."""

    def __init__(self, cache: KVCache, params: EngineParams) -> None:
        self.cache = cache
        self.params = params
        self._waiting: deque[SimRequest] = deque()
        self._running: dict[str, SimRequest] = {}
        self._ends: list[tuple[float, int, SimRequest]] = []  # (finished_at, tiebreak, req)
        self._tiebreak = 0
        self._prefill_free_at = 0.0
        self._in_flight: set[str] = set()
        self.finished_total = 0
        self.aborted_total = 0
        self.prefill_seconds_total = 0.0
        """Seconds spent prefilling, over finished requests (``vllm:request_prefill_time_seconds``
        sum: first token minus prefill start)."""
        self.prefill_computed_tokens_total = 0
        """Prompt tokens computed (not served from cache), over finished requests
        (``vllm:request_prefill_kv_computed_tokens`` sum, observed with the prefill time).

        A ``remote_kv`` request (decode half) adds nothing to either: vLLM's decode instance
        records a request as SCHEDULED only once its KV has arrived (the wait counts as queue
        time) and counts the received tokens as cached (``num_cached_tokens`` = local +
        external), so its prefill time is one step over at most the prompt's last token. A
        decode node's transfer receipts must not read as a prefill rate (they are 10-100x
        faster than prefilling); they are :attr:`kv_received_seconds_total` instead."""
        self.kv_received_seconds_total = 0.0
        """Seconds spent receiving KV from prefill engines, over finished requests."""
        self.kv_received_blocks_total = 0
        """KV blocks received from prefill engines, over finished requests."""
        self._first_token_prompt_tokens = 0  # prompts of ended requests that got a first token

    # ---- observation ---------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        """Admitted requests (prefilling or decoding)."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Queued requests not yet admitted."""
        return len(self._waiting)

    def pending_prefill_tokens(self, now: float) -> int:
        """Uncached prompt tokens admitted but not yet prefilled at ``now``, plus the queue's."""
        total = 0
        for req in self._running.values():
            if req.remote_kv:
                continue
            if req.first_token_at is not None and req.first_token_at > now:
                total += req.uncached_tokens
        return total + sum(r.prompt_tokens for r in self._waiting if not r.remote_kv)

    def prompt_tokens_at_first_token(self, now: float) -> int:
        """Prompt tokens of requests whose first token came by ``now`` (``vllm:prompt_tokens``:
        vLLM counts a prompt when its prefill yields the first token, not at the end)."""
        return self._first_token_prompt_tokens + sum(
            r.prompt_tokens for r in self._running.values()
            if r.first_token_at is not None and r.first_token_at <= now)

    def next_event_time(self) -> float | None:
        """Model time of the next request end (when :meth:`advance` has work), or None."""
        while self._ends and self._ends[0][2].aborted:
            heapq.heappop(self._ends)
        return self._ends[0][0] if self._ends else None

    def _decoding_at(self, t: float) -> int:
        """Admitted requests past their first token and not finished at ``t`` (those admitted
        later are not known yet: the interference estimate errs low)."""
        return sum(1 for r in self._running.values()
                   if r.first_token_at is not None and r.first_token_at <= t
                   and (r.finished_at is None or r.finished_at > t))

    # ---- transitions ---------------------------------------------------------------------
    def check_fits(self, req: SimRequest) -> None:
        """RequestTooLarge if ``req`` can never fit this engine's cache (what :meth:`submit`
        refuses)."""
        need = self.cache.blocks_needed(req.prompt_tokens, req.max_tokens)
        if need > self.cache.capacity:
            raise RequestTooLarge(
                f"request needs {need} KV blocks (prompt {req.prompt_tokens} + max_tokens "
                f"{req.max_tokens} tokens) but the cache holds {self.cache.capacity}")

    def submit(self, req: SimRequest, now: float) -> StepResult:
        """Queue ``req`` at ``now`` and admit what fits. Raises RequestTooLarge if it never can."""
        self.check_fits(req)
        if req.request_id in self._in_flight:
            raise ValueError(f"request id {req.request_id!r} is already in flight")
        result = self.advance(now)
        req.arrival = now
        self._waiting.append(req)
        self._in_flight.add(req.request_id)
        self._admit(now, result)
        return result

    def advance(self, now: float) -> StepResult:
        """Finish the requests that end by ``now``, admitting queued ones as slots free."""
        result = StepResult()
        while True:
            t = self.next_event_time()
            if t is None or t > now:
                break
            _, _, req = heapq.heappop(self._ends)
            self._finish(req)
            result.finished.append(req)
            self._admit(t, result)
        self._admit(now, result)
        return result

    def abort(self, request_id: str, now: float) -> bool:
        """Drop a queued or running request (client went away); frees its blocks at once."""
        for req in self._waiting:
            if req.request_id == request_id:
                self._waiting.remove(req)
                self._in_flight.discard(request_id)
                req.aborted = True
                self.aborted_total += 1
                return True
        req_run = self._running.get(request_id)
        if req_run is None:
            return False
        req_run.aborted = True
        req_run.finished_at = now
        self._finish(req_run)
        self.aborted_total += 1
        self._admit(now, StepResult())
        return True

    def _finish(self, req: SimRequest) -> None:
        self._running.pop(req.request_id, None)
        self._in_flight.discard(req.request_id)
        if req.alloc is not None:
            self.cache.release(req.alloc)
        if req.first_token_at is not None and req.finished_at is not None \
                and req.first_token_at <= req.finished_at:
            self._first_token_prompt_tokens += req.prompt_tokens
        if not req.aborted:
            self.finished_total += 1
            if req.remote_kv:  # received, not prefilled: vLLM's decode instance (below)
                self.kv_received_seconds_total += req.transfer_s
                self.kv_received_blocks_total += req.transfer_blocks
            elif req.prefill_start is not None and req.first_token_at is not None:
                self.prefill_seconds_total += req.first_token_at - req.prefill_start
                self.prefill_computed_tokens_total += req.uncached_tokens

    def _admit(self, now: float, result: StepResult) -> None:
        p = self.params
        while self._waiting and len(self._running) < p.max_running:
            req = self._waiting[0]
            alloc = (self.cache.allocate_ids(req.block_hashes, req.prompt_tokens, req.max_tokens)
                     if req.token_ids is None
                     else self.cache.allocate(req.block_hashes, req.token_ids, req.max_tokens))
            if alloc is None:
                return  # strict FIFO: the head waits for blocks to free
            self._waiting.popleft()
            req.alloc = alloc
            req.cached_tokens = alloc.cached_tokens
            req.admitted_at = now
            if req.remote_kv:
                req.prefill_start = now
                missing = req.uncached_tokens
                req.transfer_blocks = -(-missing // self.cache.block_size)
                req.transfer_s = req.transfer_blocks * p.transfer_s_per_block
                req.first_token_at = now + req.transfer_s
            else:
                start = max(now, self._prefill_free_at)
                req.prefill_start = start
                took = req.uncached_tokens / p.prefill_tokens_per_s
                if p.mixed_batch_slowdown:
                    took *= 1.0 + p.mixed_batch_slowdown * self._decoding_at(start)
                req.first_token_at = start + took
                self._prefill_free_at = req.first_token_at
            req.finished_at = req.first_token_at + (req.max_tokens - 1) * p.decode_s_per_token
            self._running[req.request_id] = req
            self._tiebreak += 1
            heapq.heappush(self._ends, (req.finished_at, self._tiebreak, req))
            result.admitted.append(req)
