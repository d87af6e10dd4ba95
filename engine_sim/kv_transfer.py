"""vLLM's disaggregated-serving request protocol (``kv_transfer_params``), as engine_sim speaks it.

vLLM's P/D proxies (its toy proxy, vllm-router ``--vllm-pd-disaggregation``, production-stack)
send the prompt to a prefill engine with ``max_tokens=1``, ``stream=false`` and
``kv_transfer_params = {"do_remote_decode": true, "do_remote_prefill": false, "remote_*": null}``;
the prefill engine's response carries ``kv_transfer_params`` telling a decode engine where to
pull the KV from (``do_remote_prefill: true``, ``remote_engine_id``, ``remote_block_ids``,
``remote_host``, ``remote_port``); the proxy copies that object into the decode request, whose
engine then loads the blocks it lacks instead of prefilling them. engine_sim models the pull as
``transfer_ms_per_block`` per block its cache lacks (:mod:`engine_sim.model`) and stores the
received blocks in its cache, so they are published as BlockStored like any computed block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_sim.model import SimRequest


@dataclass(frozen=True, slots=True)
class KvTransfer:
    """What a request's ``kv_transfer_params`` ask of this engine."""

    remote_decode: bool = False
    """Prefill here; a decode engine will pull the KV (answer with the handover parameters)."""
    remote_prefill: bool = False
    """The KV was prefilled elsewhere: receive it instead of prefilling."""


def parse(body: dict[str, Any]) -> KvTransfer:
    """The request's ``kv_transfer_params``; ValueError for a malformed one."""
    params = body.get("kv_transfer_params")
    if params is None:
        return KvTransfer()
    if not isinstance(params, dict):
        raise ValueError("kv_transfer_params must be an object")
    flags = {}
    for key in ("do_remote_decode", "do_remote_prefill"):
        value = params.get(key, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise ValueError(f"kv_transfer_params.{key} must be a boolean")
        flags[key] = value
    if flags["do_remote_decode"] and flags["do_remote_prefill"]:
        raise ValueError("kv_transfer_params: do_remote_decode and do_remote_prefill are "
                         "exclusive (prefill side / decode side)")
    return KvTransfer(flags["do_remote_decode"], flags["do_remote_prefill"])


def handover(req: SimRequest, engine_id: str, host: str, port: int,
             block_size: int) -> dict[str, Any]:
    """The prefill response's ``kv_transfer_params`` for the decode request."""
    return {"do_remote_decode": False, "do_remote_prefill": True,
            "remote_engine_id": engine_id,
            # vLLM sends physical block ids; engine_sim has no block table, so the prompt's
            # block positions (what a decode engine would read) stand in for them
            "remote_block_ids": list(range(-(-req.prompt_tokens // block_size))),
            "remote_host": host, "remote_port": port, "tp_size": 1}
