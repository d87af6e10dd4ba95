"""The routing core: one decision, on plain types, for every front end.

:meth:`RouterCore.decide` takes a :class:`~router_service.domain.RouteRequest` and returns a
:class:`~router_service.domain.RouteDecision`. It owns validation and hashing
(:mod:`.request_prep`), the placement lookup (:mod:`.lookup`: the index mirror or the registry
stream, narrowed on large fleets), the policy, the in-flight / queued-prefill tracker, "recently
routed" overlap (inside kv_aware's state, updated on commit) and degradation: with the registry
unreachable it falls back to least_loaded over the last known nodes and says so. The gRPC
servicer, the OpenAI gateway, the Envoy endpoint picker and ``kvroute bench --mode sim`` all
call it unchanged. Which nodes may serve a request (model, subset hint, exclusions) is
:mod:`.candidates`.

A decision is made in two steps: the policy *chooses* (pure: scores, no state change), then the
core *commits* it — the policy's own state (recent routes, running averages, round-robin turn),
the load tracker and the counters change only then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvroute.errors import FailedPrecondition, InvalidArgument, Unavailable
from router_service.candidates import aggregated, candidates, resolve_model, restrict
from router_service.disagg import (
    DECODE_CAPABLE,
    DECODE_KEY_SUFFIX,
    DECODE_POLICIES,
    PREFILL_CAPABLE,
    DecodeChooser,
    DisaggSettings,
    wants_pd,
)
from router_service.domain import RouteDecision, RouteRequest
from router_service.load import LoadTracker
from router_service.lookup import PlacementLookup
from router_service.metrics import RouterMetrics
from router_service.node_views import node_views, offloaded_of
from router_service.placement import NodeState, Placement, PlacementSource
from router_service.policies.base import Decision, NodeView, NoEligibleNode, Policy, RequestView
from router_service.policies.factory import PolicySet
from router_service.policies.least_loaded import LeastLoadedPolicy
from router_service.request_prep import check_id, request_view
from router_service.route_share import RouteDelta, SharedView
from router_service.settings import RouterSettings
from router_service.suspects import SuspectList
from router_service.tokenizer import Tokenizer


@dataclass(slots=True)
class _Pending:
    """A request between preparation and decision."""

    req: RouteRequest
    policy: Policy
    view: RequestView
    model: str
    t0: float


class _CountErrors:
    """Counts a failed decision in the metrics (a context manager; cheaper than contextlib's)."""

    __slots__ = ("_core", "_req")

    def __init__(self, core: RouterCore, req: RouteRequest) -> None:
        self._core, self._req = core, req

    def __enter__(self) -> None:
        return None

    def __exit__(self, t: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if isinstance(exc, Exception):
            self._core._count_error(self._req, exc)


_MAX_FALLBACKS = 4
_PRUNE_EVERY = 1024
"""Decisions between sweeps for departed nodes' queued-prefill estimates."""


class RouterCore:
    """Routing decisions and in-flight accounting for one router process."""

    def __init__(self, settings: RouterSettings, policies: PolicySet, source: PlacementSource,
                 tracker: LoadTracker, tokenizer: Tokenizer,
                 metrics: RouterMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 disagg: DisaggSettings | None = None,
                 share: SharedView | None = None) -> None:
        self.settings = settings
        self.decode = DecodeChooser(disagg)
        """Decode half of disaggregated pairs (:mod:`router_service.disagg`)."""
        self.policies = policies
        self.source = source
        self.tracker = tracker
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.suspects = SuspectList(clock)
        self._fallback = LeastLoadedPolicy(use_queue_depth=False)  # queue depths are stale
        self._lookup = PlacementLookup(source, tracker, settings.max_candidates)
        source.on_departure(self._departed)
        if policies.get(settings.default_policy) is None:
            raise ValueError(f"--default-policy: unknown policy {settings.default_policy!r}; "
                             f"known: {', '.join(policies.names)}")
        self.decisions_by_policy: dict[str, int] = {}
        self.degraded_decisions = 0
        self.predicted_cached_tokens = 0
        self.reported_cached_tokens = 0
        self._expired_seen = 0
        self._decisions = 0
        self.share = share
        """This replica's end of the shared view of load (None = a single router)."""
        self.own_view_decisions = 0
        """Decisions made on this replica's own counts because the shared view was lost."""

    # -- decide ---------------------------------------------------------------------------
    async def decide(self, req: RouteRequest) -> RouteDecision:
        """One decision; raises :mod:`kvroute.errors` types for bad input or no node. In a
        burst next to other replicas with ``--share-burst-stagger-s``, it first waits its turn
        (:meth:`SharedView.stagger_wait`)."""
        wait = self.share.stagger_wait() if self.share is not None else 0.0
        if wait > 0:
            if self.metrics is not None:
                self.metrics.staggered_decisions.inc()
            await asyncio.sleep(wait)
        if self.source.local:
            return self.decide_local(req)
        with _CountErrors(self, req):
            p = self._prepare(req)
            placement, why, p.view = await self._lookup.remote(p.policy, p.view, p.model)
            return self._decide(p, placement, why)

    def decide_local(self, req: RouteRequest) -> RouteDecision:
        """:meth:`decide` without an await: for placement sources that answer from memory
        (``source.local``: the index mirror, the bench's simulated fleet)."""
        with _CountErrors(self, req):
            p = self._prepare(req)
            placement, why, p.view = self._lookup.local(p.policy, p.view, p.model)
            return self._decide(p, placement, why)

    def _prepare(self, req: RouteRequest) -> _Pending:
        t0 = time.perf_counter()
        name = req.policy or self.settings.default_policy
        policy = self.policies.get(name)
        if policy is None:
            raise InvalidArgument(f"policy: unknown policy {name!r}; known: "
                                  f"{', '.join(self.policies.names)}")
        rbs = self.source.registry_block_size()
        if rbs and rbs != self.settings.block_size and not req.block_hashes:
            raise FailedPrecondition(
                f"block size mismatch: router hashes {self.settings.block_size}-token blocks, "
                f"the registry uses {rbs}; set --block-size {rbs}")
        view = request_view(req, self.settings, self.tokenizer, rbs)
        if self.share is not None:
            replicas, rank = self.share.replica_slot()
            if replicas > 1:
                view = dataclasses.replace(view, replicas=replicas, replica_rank=rank)
        model = resolve_model(req.model, self.settings.default_model, self.source)
        return _Pending(req, policy, view, model, t0)

    def _decide(self, p: _Pending, placement: Placement | None, degraded_why: str,
                ) -> RouteDecision:
        req, policy, view, model = p.req, p.policy, p.view, p.model
        pairs, off = candidates(placement, degraded_why, model, self.source)
        pairs = restrict(req, pairs)
        chooser = self._fallback if degraded_why else policy
        if wants_pd([n.role for n, _ in pairs], req.disaggregated):
            out = self._decide_pd(req, chooser, view, model, pairs, degraded_why, off)
        else:
            pairs = aggregated(pairs, model)
            views = self._views(pairs, view, off)
            try:
                decision = chooser.choose(view, views)
            except NoEligibleNode as exc:
                raise Unavailable(f"no healthy node serves model {model!r} ({exc}); "
                                  f"retry later") from None
            out = self._commit(chooser, view, decision, pairs, degraded_why, req.deadline_s,
                               offloaded_of(views, decision.node_id))
        if self.metrics is not None:
            m = self.metrics
            m.route_latency.observe(time.perf_counter() - p.t0)
            m.decision_ok(out.policy, out.degraded)
            if out.expected_cached_tokens:
                m.predicted_cached_tokens.inc(out.expected_cached_tokens)
            if out.expected_offloaded_tokens:
                m.predicted_offloaded_tokens.inc(out.expected_offloaded_tokens)
            m.prompt_tokens.inc(out.prompt_tokens)
            if out.degraded:
                m.degraded.inc()
        return out

    def _views(self, pairs: list[tuple[NodeState, int]], view: RequestView,
               offloaded: dict[str, int] | None = None) -> list[NodeView]:
        share = self.share
        remote = share.remote if share is not None and share.live() else None
        return self.suspects.demote(node_views(pairs, view, offloaded or {}, self.tracker,
                                               remote, self._calibrated))

    def _decide_pd(self, req: RouteRequest, chooser: Policy, view: RequestView, model: str,
                   pairs: list[tuple[NodeState, int]], degraded_why: str,
                   off: dict[str, int]) -> RouteDecision:
        """A (prefill, decode) pair: the policy picks the prefill node among prefill-capable
        nodes, :class:`DecodeChooser` the decode node given it; both are committed together."""
        if req.decode_policy is not None and req.decode_policy not in DECODE_POLICIES:
            raise InvalidArgument(f"decode_policy: unknown {req.decode_policy!r}; known: "
                                  f"{', '.join(DECODE_POLICIES)}")
        pre = [(n, m) for n, m in pairs if n.role in PREFILL_CAPABLE]
        dec = [(n, m) for n, m in pairs if n.role in DECODE_CAPABLE]
        if not pre or not dec:
            half = "prefill" if not pre else "decode"
            raise Unavailable(f"disaggregated: no {half}-capable node of model {model!r} is "
                              f"known or left after the request's hints; retry later")
        try:
            pre_views = self._views(pre, view, off)
            decision, pick = self.decode.choose_pair(
                view, chooser.choose(view, pre_views), self._views(dec, view),
                req.decode_policy, joint=chooser.name == "kv_aware")
        except NoEligibleNode as exc:
            raise Unavailable(f"disaggregated: no pair for model {model!r} ({exc}); "
                              f"retry later") from None
        out = self._commit(chooser, view, decision, pre, degraded_why, req.deadline_s,
                           offloaded_of(pre_views, decision.node_id))
        self.decode.commit(pick, view.request_id)
        node = next(n for n, _ in dec if n.node_id == pick.node_id)
        if pick.node_id != out.node_id:
            self.tracker.start(view.request_id + DECODE_KEY_SUFFIX, pick.node_id, 0,
                               view.prompt_tokens, req.deadline_s)
        return dataclasses.replace(
            out, decode_node_id=node.node_id, decode_address=node.address,
            decode_matched_blocks=pick.matched_blocks, transfer_blocks=pick.transfer_blocks,
            decode_reason=pick.reason, decode_candidates=pick.candidates)

    def _commit(self, policy: Policy, view: RequestView, decision: Decision,
                pairs: list[tuple[NodeState, int]], degraded_why: str,
                deadline_s: float | None = None, offloaded_blocks: int = 0) -> RouteDecision:
        node = next(n for n, _ in pairs if n.node_id == decision.node_id)
        policy.commit(view, decision)
        cached = min(decision.matched_blocks * view.block_size, view.prompt_tokens)
        self.tracker.start(view.request_id, node.node_id, view.prompt_tokens - cached, cached,
                           deadline_s)
        share = self.share
        if share is not None:
            share.routed(view.request_id, node.node_id, view.prompt_tokens - cached, cached,
                         view.block_hashes)
            if self.metrics is not None:
                self.metrics.shared_view_published.inc()
        self._sync_expired()
        self._decisions += 1
        if self._decisions % _PRUNE_EVERY == 0:
            self._forget_departed()
        used = policy.name
        self.decisions_by_policy[used] = self.decisions_by_policy.get(used, 0) + 1
        self.predicted_cached_tokens += cached
        reason = decision.reason
        if view.replicas > 1 and self.metrics is not None:
            self.metrics.burst_decisions.inc()
        if share is not None and share.why_not:
            self.own_view_decisions += 1
            reason = f"OWN COUNTS ONLY (shared view lost: {share.why_not}); {reason}"
            if self.metrics is not None:
                self.metrics.own_view_decisions.inc()
        if degraded_why:
            self.degraded_decisions += 1
            reason = f"DEGRADED (registry unreachable: {degraded_why}); {reason}"
        addr = {n.node_id: n.address for n, _ in pairs}
        fallbacks = tuple(addr[c.node_id] for c in decision.candidates
                          if not c.excluded and c.node_id != node.node_id
                          and c.node_id in addr)[:_MAX_FALLBACKS]
        return RouteDecision(
            request_id=view.request_id, node_id=node.node_id, address=node.address,
            policy=used, matched_blocks=decision.matched_blocks,
            expected_cached_tokens=cached, reason=reason, degraded=bool(degraded_why),
            prompt_tokens=view.prompt_tokens, block_size=view.block_size,
            candidates=decision.candidates, fallback_addresses=fallbacks,
            offloaded_blocks=offloaded_blocks,
            expected_offloaded_tokens=min(offloaded_blocks * view.block_size,
                                          max(0, view.prompt_tokens - cached)))

    def _calibrated(self, node_id: str, rate: float) -> None:
        """A node's measured prefill rate changed: drain its queued-prefill estimate at it."""
        self.tracker.set_rate(node_id, rate)
        if self.metrics is not None:
            self.metrics.prefill_rate.labels(node_id).set(rate)

    def _departed(self, node_id: str) -> None:
        """A node left the registry: its queued-prefill estimate and calibrated rate go now
        (a node that comes back, e.g. after an engine restart, starts with an empty queue)."""
        self.tracker.forget_node(node_id)

    def _forget_departed(self) -> None:
        """Drop the queued-prefill estimate of nodes the registry no longer knows (a sweep
        behind :meth:`_departed`, for departures no source reported)."""
        known = {n.node_id for n in self.source.last_known()}
        for nid in self.tracker.pending_nodes():
            if nid not in known:
                self.tracker.forget_node(nid)

    def _count_error(self, req: RouteRequest, exc: Exception) -> None:
        if self.metrics is None:
            return
        code = getattr(getattr(exc, "code", None), "name", "INTERNAL")
        name = req.policy or self.settings.default_policy
        label = name if self.policies.get(name) else "unknown"
        self.metrics.decisions.labels(label, str(code).lower()).inc()

    def _sync_expired(self) -> None:
        delta = self.tracker.expired_total - self._expired_seen
        if delta:
            self._expired_seen = self.tracker.expired_total
            if self.metrics is not None:
                self.metrics.inflight_expired.inc(delta)

    # -- complete, suspects, fleet view -----------------------------------------------------
    def complete(self, request_id: str, success: bool = True,
                 cached_tokens: int | None = None) -> bool:
        """Release a request's in-flight load; True if it was in flight here.

        ``cached_tokens`` is what the engine reported serving from cache (for predicted vs
        actual). ``success`` is informational (a failed request releases its load too).
        """
        check_id(request_id, "request_id")
        released = self.tracker.complete(request_id) is not None
        released = self.tracker.complete(request_id + DECODE_KEY_SUFFIX) is not None or released
        self.decode.handed_over(request_id)
        share = self.share
        # Released here, or another replica's request completed through this one (a Service
        # spreads Complete calls too): either way every other replica releases it.
        if share is not None and (released
                                  or share.remote.complete(None, request_id) is not None):
            released = True
            share.completed(request_id)
            if self.metrics is not None:
                self.metrics.shared_view_published.inc()
        self._sync_expired()
        if cached_tokens is not None:
            if cached_tokens < 0:
                raise InvalidArgument(f"cached_tokens: must be >= 0 (got {cached_tokens})")
            self.reported_cached_tokens += cached_tokens
            if self.metrics is not None:
                self.metrics.reported_cached_tokens.inc(cached_tokens)
        if self.metrics is not None:
            self.metrics.completes.labels("released" if released else "unknown").inc()
        return released

    def apply_remote(self, delta: RouteDelta) -> None:
        """Apply another replica's routing delta to the shared view (the transport calls it;
        see :meth:`router_service.route_share.SharedView.apply`)."""
        if self.share is not None:
            self.share.apply(delta, self.tracker, self.policies, self.metrics)

    def complete_prefill(self, request_id: str) -> bool:
        """A disaggregated request's prefill half is done (its KV handed over): release the
        prefill node's load; the decode half stays in flight until :meth:`complete`."""
        check_id(request_id, "request_id")
        self.decode.handed_over(request_id)
        return self.tracker.complete(request_id) is not None

    def mark_suspect(self, node_id: str, why: str) -> None:
        """A front end could not reach ``node_id`` (connect error, 5xx before the first byte):
        prefer other nodes for a while (see :class:`router_service.suspects.SuspectList`)."""
        self.suspects.mark(node_id, why)

    def known_nodes(self) -> list[NodeState]:
        """Every node known from the registry (healthy or not)."""
        return self.source.last_known()

    def healthy_node_count(self, model: str | None = None) -> int:
        """Healthy known nodes (of ``model`` when given)."""
        return sum(1 for n in self.source.last_known()
                   if n.healthy and (model is None or n.model == model))

    def describe(self) -> dict[str, Any]:
        """A short summary for the startup log."""
        return {"mode": self.source.mode, "default_policy": self.settings.default_policy,
                "policies": self.policies.names, "tokenizer": self.tokenizer.name,
                "block_size": self.settings.block_size}
