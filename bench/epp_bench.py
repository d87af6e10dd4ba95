"""``kvroute bench epp``: the endpoint picker's added latency per request through a real Envoy.

Starts the whole stack as processes on loopback (etcd, registry, engine_sim + agents, ``kvroute
serve epp``) and two Envoys from the committed ``deploy/envoy/epp-bootstrap.yaml``:

- ``epp``: the bootstrap as shipped (ext_proc to the picker, full-duplex streamed bodies,
  ORIGINAL_DST to the picked endpoint);
- ``plain``: the same listener with the ext_proc filter removed, round robin over the engines.

One client sends fresh token-id prompts (``max_tokens`` 1) alternately through both, in pairs,
so the two arms share the machine's load at the same moment; added latency is the median of the
paired differences (epp - plain), per prompt size. Engines run at a tiny time scale so their
simulated prefill is the same small cost on both arms.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.epp_stack import EnvoyProcess, EppStack
from bench.stack_fleet import FleetSpec
from kvroute.settings import add_value_arguments, setting, value_arguments


@dataclass
class EppBenchConfig:
    """Knobs of the picker latency benchmark."""

    prompt_tokens: tuple[int, ...] = setting((256, 2048, 16384),
                                             "prompt sizes in tokens, comma-separated")
    pairs: int = setting(200, "measured request pairs (plain, epp) per prompt size")
    warmup: int = setting(20, "unmeasured pairs first")
    nodes: int = 3
    seed: int = 11
    request_body_mode: str = setting(
        "FULL_DUPLEX_STREAMED", "request_body_mode of the picker's Envoy (bodies over 1 MiB "
                                "need FULL_DUPLEX_STREAMED)",
        flag="--epp-body-mode", choices=("FULL_DUPLEX_STREAMED", "BUFFERED"))


@dataclass
class Arm:
    """Client-side latencies of one arm at one prompt size (ms)."""

    samples_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        s = sorted(self.samples_ms)
        return {"p50_ms": round(statistics.median(s), 3),
                "p90_ms": round(s[int(0.9 * (len(s) - 1))], 3),
                "mean_ms": round(statistics.fmean(s), 3)}


async def _one(http: aiohttp.ClientSession, env: EnvoyProcess, body: bytes) -> float:
    t0 = time.perf_counter()
    async with http.post(f"{env.url}/v1/completions", data=body,
                         headers={"content-type": "application/json"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{env.name}: HTTP {resp.status}")
    return (time.perf_counter() - t0) * 1000.0


async def _measure(cfg: EppBenchConfig, epp: EnvoyProcess, plain: EnvoyProcess,
                   ) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    conn = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as http:
        for n in cfg.prompt_tokens:
            arms = {"plain": Arm(), "epp": Arm()}
            diffs: list[float] = []
            for i in range(cfg.warmup + cfg.pairs):
                bodies = [json.dumps({"prompt": [rng.randrange(1, 50_000) for _ in range(n)],
                                      "max_tokens": 1}).encode() for _ in range(2)]
                order = [("plain", plain), ("epp", epp)]
                if i % 2:
                    order.reverse()  # neither arm always goes first
                got = {name: await _one(http, env, body)
                       for (name, env), body in zip(order, bodies, strict=True)}
                if i < cfg.warmup:
                    continue
                for name, ms in got.items():
                    arms[name].samples_ms.append(ms)
                diffs.append(got["epp"] - got["plain"])
            out[str(n)] = {
                "plain": arms["plain"].summary(), "epp": arms["epp"].summary(),
                "added_p50_ms": round(statistics.median(diffs), 3),
                "added_mean_ms": round(statistics.fmean(diffs), 3),
                "pairs": len(diffs),
                "body_bytes": len(bodies[0])}
    return out


def run_epp_bench(cfg: EppBenchConfig, workdir: Path | None = None) -> dict[str, Any]:
    """Start the stack, measure, stop everything; the report as a dict."""
    base = workdir or Path(tempfile.mkdtemp(prefix="kvroute-bench-epp-"))
    spec = FleetSpec(nodes=cfg.nodes, cache_blocks=65_536, time_scale=0.0001,
                     decode_ms_per_token=1.0, start_router=False, heartbeat_interval_s=0.2)
    with EppStack(base, spec, picker_args=("--log-level", "warning",
                                           "--no-expose-decision")) as st:
        mode = "" if cfg.request_body_mode == "FULL_DUPLEX_STREAMED" else cfg.request_body_mode
        epp = st.add_envoy("envoy-epp", request_body_mode=mode)
        plain = st.add_envoy("envoy-plain", plain=True)
        results = asyncio.run(_measure(cfg, epp, plain))
    return {"bench": "epp", "config": asdict(cfg), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "by_prompt_tokens": results}


def add_epp_arguments(p: Any) -> None:
    """Flags of ``kvroute bench epp`` (prefixed ``--epp-``)."""
    add_value_arguments(p.add_argument_group("epp (kvroute bench epp)"), EppBenchConfig,
                        prefix="epp-")


def run_epp_cli(args: Any) -> int:
    """``kvroute bench epp [--json PATH]``."""
    given = value_arguments(EppBenchConfig, args, prefix="epp-")
    cfg = EppBenchConfig(**{**given, "prompt_tokens": tuple(
        int(x) for x in given["prompt_tokens"].split(","))})
    report = run_epp_bench(cfg)
    print(f"endpoint picker through Envoy ({cfg.request_body_mode}) vs Envoy round robin, "
          f"{cfg.pairs} pairs per size (load average {report['load_avg_1m']}):")
    print(f"  {'tokens':>7} {'plain p50':>10} {'epp p50':>9} {'added p50':>10} {'added mean':>11}")
    for n, r in report["by_prompt_tokens"].items():
        print(f"  {n:>7} {r['plain']['p50_ms']:>8.2f}ms {r['epp']['p50_ms']:>7.2f}ms "
              f"{r['added_p50_ms']:>8.2f}ms {r['added_mean_ms']:>9.2f}ms")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
