"""A disaggregated fleet behind kvroute's OpenAI gateway (``kvroute serve gateway``).

The fleet is :class:`bench.stack_fleet.StackFleet` with a role per engine (agents register
``--role prefill|decode``) and a gateway; every request is one ``POST /v1/completions`` to the
gateway, which decides the (prefill, decode) pair in-process and orchestrates it
(:mod:`router_service.gateway.pd`: prefill with vLLM's ``kv_transfer_params``, then decode).
``user`` = the request id reaches both engines' records, so the run is built from them exactly
as for the peer routers' PD modes (:func:`bench.stack_pd_peer.replay_pd_router`). Used by
``kvroute demo``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.prompts import Prompt, json_body
from bench.sim.pd_replay import PdRun
from bench.stack_pd_peer import replay_pd_router
from bench.workloads.base import Workload
from kvroute.settings import settings_flags
from router_service.disagg import DisaggSettings

if TYPE_CHECKING:
    from bench.stack_backend import StackBackend


def pd_router_flags(disagg: DisaggSettings, time_scale: float) -> tuple[str, ...]:
    """The ``--pd-*`` flags of a router or gateway on the wall clock of a replay compressed by
    ``time_scale`` (its seconds-valued costs scale with it, as :func:`router_flags` does)."""
    scaled = dataclasses.replace(
        disagg, pd_transfer_s_per_block=disagg.pd_transfer_s_per_block * time_scale,
        pd_decode_load_cost_s=disagg.pd_decode_load_cost_s * time_scale,
        pd_headroom_penalty_s=disagg.pd_headroom_penalty_s * time_scale)
    return settings_flags(scaled)


class _Gateway:
    """The already running gateway, in the shape :func:`replay_pd_router` starts and stops."""

    def __init__(self, base: str) -> None:
        self.base = base

    def start(self) -> None:
        """Nothing to start: the fleet runs it."""

    def stop(self) -> None:
        """Nothing to stop: the fleet does."""


def replay_gateway_pd(stack: StackBackend, workload: Workload, prefill_nodes: int,
                      prompts: list[Prompt],
                      label: str = "gateway-pd:kv_aware/kv_aware",
                      progress: Callable[[int], None] | None = None) -> PdRun:
    """Replay ``workload`` once through the gateway of the running P+D ``stack`` (its first
    ``prefill_nodes`` engines prefill); the run from the engines' records. The caller starts
    and stops the stack (``kvroute demo`` starts it while it computes something else;
    ``kvroute bench --mode stack --pd-gateway`` next to the Router-API rows and the peers).
    The gateway releases the prefill node's in-flight count in-process, as soon as the
    prefill answer is read (:meth:`router_service.gateway.pd.PdForwarder._prefilled`): no
    client hop, as for vllm-router; the row has no ``return_lag_ms``."""
    import asyncio

    spec = stack.spec
    engines = stack.fleet.engines

    def body(i: int) -> tuple[str, bytes]:
        r = workload.requests[i]
        return "/v1/completions", json_body({"model": spec.model,
                                             "max_tokens": max(1, r.output_tokens),
                                             "user": r.request_id}, "prompt", prompts[i])

    return asyncio.run(replay_pd_router(
        _Gateway(stack.fleet.gateway_url), label, workload, engines[:prefill_nodes],
        engines[prefill_nodes:], body, spec.time_scale, spec.prefill_tokens_per_s, progress))
