"""sglang-router 0.3.x in its disaggregated mode in front of the same P+D engine_sim fleet.

``python -m sglang_router.launch_router --pd-disaggregation --prefill URL BOOTSTRAP_PORT ...
--decode URL ... --prefill-policy P --decode-policy D`` adds ``bootstrap_host``,
``bootstrap_port`` and a random ``bootstrap_room`` to each request and sends it to the chosen
prefill and decode engines at once (SGLang's PD protocol, :mod:`engine_sim.bootstrap`; engine_sim's
bootstrap server is its HTTP port). Token-id prompts go to its ``/generate`` with ``input_ids``
(its ``/v1/completions`` refuses token ids) and ``rid`` = the request id, which reaches both
engines' records. Its PD mode's ``cache_aware`` matches a ``/generate`` request by its ``text``
only (read from its source: ``route_generate`` passes ``body.text``), so for that policy the
replay also sends the ids' decimal text as ``text``, the form its aggregated mode matches;
engine_sim computes ``input_ids`` when both are given (a real SGLang server would refuse
both). The run is built from the records as for vllm-router's PD mode
(:func:`bench.stack_pd_peer.replay_pd_router`): the decode record starts when the prefill's KV
was ready (its wait is ``kv_wait_s``), so TTFT = prefill record + decode record, like kvroute's.
Runs with ``HF_ENDPOINT`` pointing nowhere (it never fetches a tokenizer, PEERS.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from bench.peers.process import RouterProcess
from bench.prompts import Prompt, json_body
from bench.sim.pd_replay import PdRun
from bench.stack_fleet import EngineHandle
from bench.stack_pd_peer import replay_pd_router
from bench.workloads.base import Workload
from kvroute.procs import free_port

POLICIES = ("random", "round_robin", "cache_aware", "power_of_two")
"""sglang-router's prefill and decode policies offered here."""


def sglang_router_argv(port: int, prefill: list[EngineHandle], decode: list[EngineHandle],
                       prefill_policy: str, decode_policy: str) -> list[str]:
    """The router's command line (each prefill engine's bootstrap port is its HTTP port)."""
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
            "--port", str(port), "--pd-disaggregation"]
    for e in prefill:
        argv += ["--prefill", e.url, str(e.ready["http_port"])]
    for e in decode:
        argv += ["--decode", e.url]
    return [*argv, "--prefill-policy", prefill_policy, "--decode-policy", decode_policy,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--log-level", "warn"]


async def replay_sglang_router_pd(workload: Workload, prefill_policy: str, decode_policy: str,
                                  prefill: list[EngineHandle], decode: list[EngineHandle],
                                  model: str, workdir: Path, time_scale: float,
                                  prefill_tokens_per_s: float, prompts: list[Prompt],
                                  progress: Callable[[int], None] | None = None) -> PdRun:
    """One replay through a fresh sglang-router PD process (caches already emptied)."""
    import importlib.util

    for policy in (prefill_policy, decode_policy):
        if policy not in POLICIES:
            raise ValueError(f"sglang-router PD policy {policy!r}: one of {', '.join(POLICIES)}")
    if importlib.util.find_spec("sglang_router") is None:
        raise RuntimeError("sglang-router is not installed (pip install 'kvroute[peers]')")
    texts = [p.json.decode() for p in prompts] if prefill_policy == "cache_aware" \
        else [""] * len(prompts)
    port = free_port()
    proc = RouterProcess(f"sglang-router-pd-{prefill_policy}-{decode_policy}",
                         sglang_router_argv(port, prefill, decode, prefill_policy,
                                            decode_policy), port, workdir)

    def body(i: int) -> tuple[str, bytes]:
        r = workload.requests[i]
        # its PD mode's cache_aware matches only a request's ``text`` (its aggregated mode also
        # the ids): the ids' decimal text goes next to input_ids, which the engines compute
        return "/generate", json_body({"model": model, "rid": r.request_id, "sampling_params": {
            "max_new_tokens": max(1, r.output_tokens)}, "text": texts[i]}, "input_ids",
            prompts[i])

    return await replay_pd_router(proc, f"sglang-router-pd:{prefill_policy}/{decode_policy}",
                                  workload, prefill, decode, body, time_scale,
                                  prefill_tokens_per_s, progress)
