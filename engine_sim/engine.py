"""The running simulated engine: the pure model on a scaled wall clock, publishing KV events.

:class:`SimEngine` owns the cache, the scheduler model and the event publisher. HTTP handlers
call :meth:`SimEngine.submit` and then wait for the request's model times with
:meth:`SimEngine.sleep_until`; a driver task advances the model when requests end. Every
scheduler step that changed the cache publishes one event batch, like vLLM's engine core.
Per-request records (engine-side truth for the bench) are kept in a bounded list.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from engine_sim.cache import EngineHasher, KVCache
from engine_sim.events import EventEncoder, KVEventPublisher
from engine_sim.model import EngineModel, SimRequest, StepResult
from engine_sim.settings import EngineSimSettings
from engine_sim.ttft import TtftHistogram
from kvroute.aio import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestRecord:
    """What the engine did for one finished request (times in model seconds)."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    arrival: float
    admitted_at: float
    first_token_at: float
    finished_at: float
    transfer_blocks: int = 0
    """Disaggregated decode: KV blocks received from the prefill engine instead of computed."""
    remote_kv: bool = False
    """Its KV was prefilled elsewhere (vLLM's ``kv_transfer_params.do_remote_prefill`` or the
    decode half of SGLang's ``bootstrap_room``)."""
    kv_wait_s: float = 0.0
    """SGLang decode half: model seconds it waited for the prefill before arriving here."""

    @property
    def ttft(self) -> float:
        """Time to first token."""
        return self.first_token_at - self.arrival


class SimEngine:
    """Cache + model + events on a clock where wall time = model time * ``time_scale``."""

    def __init__(self, settings: EngineSimSettings) -> None:
        self.settings = settings
        self.hasher = EngineHasher(settings.seed)
        params = settings.engine_params()
        self.cache = KVCache(params.capacity_blocks, params.block_size)
        self.model = EngineModel(self.cache, params)
        self.publisher = KVEventPublisher(
            EventEncoder(settings.encoding, settings.hash_type, settings.data_parallel_rank),
            settings.events_endpoint, settings.replay_endpoint, topic=settings.topic,
            buffer_steps=settings.buffer_steps, hwm=settings.hwm,
            replay_form=settings.replay_form)
        self._t0 = time.monotonic()
        self._admitted: dict[str, asyncio.Future[SimRequest]] = {}
        self._records: deque[RequestRecord] = deque(maxlen=settings.stats_records or None)
        self._records_seen = 0
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task[None] | None = None
        self.started_unix = time.time()
        self.completion_tokens_total = 0
        self.ttft = TtftHistogram()

    # ---- clock ---------------------------------------------------------------------------
    def now(self) -> float:
        """Model time (seconds since start, divided by ``time_scale``)."""
        return (time.monotonic() - self._t0) / self.settings.time_scale

    async def sleep_until(self, model_t: float) -> None:
        """Sleep until model time ``model_t``."""
        delay = (model_t - self.now()) * self.settings.time_scale
        if delay > 0.0005:
            await asyncio.sleep(delay)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the event sockets and start the driver."""
        self.publisher.start()
        self._wake = asyncio.Event()
        self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def stop(self) -> None:
        """Stop the driver and close the sockets."""
        try:
            await cancel_and_wait(self._driver)
        finally:  # also when the caller is cancelled while waiting
            await self.publisher.stop()

    async def _drive(self) -> None:
        assert self._wake is not None
        while True:
            nxt = self.model.next_event_time()
            timeout = (None if nxt is None
                       else max(0.0, (nxt - self.now()) * self.settings.time_scale))
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the wake-up, and the driver would never stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            try:
                self._after(self.model.advance(self.now()))
            except Exception:  # keep serving; a bug here must not stop the engine
                log.exception("engine step failed")

    def _after(self, result: StepResult) -> None:
        events = self.cache.drain_events()
        if events:
            self.publisher.publish(events)
        for req in result.admitted:
            fut = self._admitted.pop(req.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(req)
        for req in result.finished:
            if not req.aborted:
                self._record(req)

    def _record(self, req: SimRequest) -> None:
        assert req.admitted_at is not None and req.first_token_at is not None
        assert req.finished_at is not None
        self.completion_tokens_total += req.max_tokens
        self.ttft.observe(req.first_token_at - req.arrival)
        self._records_seen += 1
        if self.settings.stats_records:
            self._records.append(RequestRecord(
                req.client_request_id or req.request_id, req.prompt_tokens,
                req.cached_tokens, req.max_tokens,
                req.arrival, req.admitted_at, req.first_token_at, req.finished_at,
                req.transfer_blocks, req.remote_kv, req.kv_wait_s))

    # ---- requests ------------------------------------------------------------------------
    def make_request(self, token_ids: list[int], max_tokens: int,
                     client_request_id: str = "") -> SimRequest:
        """A request with a fresh engine id and its prompt's block hashes.

        Raises ValueError for token ids outside uint32.
        """
        hashes = self.hasher.hash_blocks(token_ids, self.settings.block_size)
        return SimRequest(request_id=f"sim-{next(self._ids)}", token_ids=token_ids,
                          block_hashes=hashes, max_tokens=max_tokens,
                          client_request_id=client_request_id)

    async def submit(self, req: SimRequest) -> SimRequest:
        """Queue ``req`` and wait until it is admitted (its model times are then known).

        Raises RequestTooLarge / ValueError before queueing. Cancelling the wait aborts it.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[SimRequest] = loop.create_future()
        self._admitted[req.request_id] = fut
        try:
            self._after(self.model.submit(req, self.now()))
        except BaseException:
            self._admitted.pop(req.request_id, None)
            raise
        if self._wake is not None:
            self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            self.abort(req)
            raise

    def abort(self, req: SimRequest) -> None:
        """Drop a request whose client went away (frees its blocks)."""
        self._admitted.pop(req.request_id, None)
        if req.finished_at is not None and req.finished_at <= self.now():
            return
        if self.model.abort(req.request_id, self.now()):
            self._after(StepResult())
            if self._wake is not None:
                self._wake.set()

    def reset_prefix_cache(self) -> bool:
        """vLLM's ``/reset_prefix_cache``: False while requests hold blocks."""
        ok = self.cache.reset()
        self._after(StepResult())
        return ok

    # ---- views ---------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """Instant load figures (``/get_load``)."""
        return {
            "num_running": self.model.num_running,
            "num_waiting": self.model.num_waiting,
            "num_requests": self.model.num_running + self.model.num_waiting,
            "pending_prefill_tokens": self.model.pending_prefill_tokens(self.now()),
            "kv_cache_usage": self.cache.usage,
            "used_blocks": self.cache.used_blocks,
            "cached_blocks": self.cache.cached_blocks,
            "capacity_blocks": self.cache.capacity,
        }

    def stats(self, since: int = 0, with_records: bool = True) -> dict[str, Any]:
        """Engine-side truth for the bench: counters, and records from index ``since`` on."""
        c = self.cache.counters
        first_kept = self._records_seen - len(self._records)
        records: list[dict[str, Any]] = []
        if with_records:
            start = max(since - first_kept, 0)
            records = [asdict(r) for r in itertools.islice(self._records, start, None)]
        return {
            "model": self.settings.model,
            "block_size": self.settings.block_size,
            "capacity_blocks": self.cache.capacity,
            "time_scale": self.settings.time_scale,
            "model_time_s": self.now(),
            "requests_finished": self.model.finished_total,
            "requests_aborted": self.model.aborted_total,
            "requests_admitted": c.requests,
            "requests_with_hit": c.requests_with_hit,
            "prompt_tokens": c.queries_tokens,
            "cached_tokens": c.hits_tokens,
            "hit_rate": (c.hits_tokens / c.queries_tokens) if c.queries_tokens else 0.0,
            "completion_tokens": self.completion_tokens_total,
            "stored_blocks": c.stored_blocks,
            "evicted_blocks": c.evicted_blocks,
            "cache_resets": c.cleared,
            "event_batches": self.publisher.batches_total,
            "next_event_seq": self.publisher.next_seq,
            "records_total": self._records_seen,
            "records_first_index": first_kept,
            "records": records,
            **self.load(),
        }

    def clear_records(self) -> None:
        """Forget the per-request records (counters stay monotonic)."""
        self._records.clear()
        self._records_seen = 0
