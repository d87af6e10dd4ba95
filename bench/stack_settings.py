"""Settings of ``kvroute bench --mode stack`` (its flags are made from them by
:func:`kvroute.settings.add_value_arguments`; the drivers read them from ``args``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kvroute.errors import ConfigError
from kvroute.settings import setting, value_arguments


@dataclass(frozen=True)
class StackSettings:
    """Flags only ``--mode stack`` uses (and ``--repeat``, which the sim uses too)."""

    time_scale: float = setting(
        0.2, "stack: wall seconds per simulated second (default 0.2 = 5x faster; at 0.05 a "
             "busy 2-core machine cannot keep the trace's timing — the table's arrival-lag "
             "line shows it)", metavar="S")
    random_bound: bool = setting(
        False, "stack: also replay the random policy for the random bound when it is not "
               "among --policies (one more replay; off by default)")
    workdir: str | None = setting(
        None, "stack: directory for process logs (default: a new temporary one)", metavar="DIR")
    peers: str | None = setting(
        None, "stack: also replay through real peer routers, each on a fresh fleet (needs the "
              "[peers] extra): router:policy,... from sglang-router:{cache_aware,round_robin,"
              "power_of_two}, vllm-router:{cache_aware,kv_aware}, dynamo:kv; 'default' = "
              "sglang-router:cache_aware,vllm-router:cache_aware,vllm-router:kv_aware,dynamo:kv; "
              "with --policies '' the peers alone (no kvroute fleet)",
        metavar="LIST")
    overhead_pairs: int = setting(
        100, "stack --peers: direct-vs-routed request pairs measuring each router's added "
             "latency (0 = skip)", metavar="N")
    repeat: int = setting(
        1, "run the whole comparison N times back to back and report the run-to-run spread of "
           "every router's hit rate and TTFT percentiles (JSON: runs, spread); stack: each run "
           "on fresh processes; sim: run k uses --seed + k (draws of --arrival-jitter-s and of "
           "random policies; without jitter the other policies repeat exactly); "
           "disaggregated (--prefill-nodes/--decode-nodes): each row's mean, sd, min-max over "
           "the runs (JSON repeats)", metavar="N")
    fault: str | None = setting(
        None, "stack: inject faults into each replay at trace times (each policy is replayed "
              "without faults first, as the baseline) and report failed requests, decisions "
              "naming a dead node, blind decisions, placements lost and the hit rate in the "
              "fault window: kill-registry@T[+D], sigterm-registry@T[+D], "
              "rolling-restart-registries@T (runs 2 registries), pause-etcd@T+D, "
              "restart-etcd@T+D, kill-engine:NODE@T, kill-agent:NODE@T (NODE = engine-0...; T, "
              "D in trace seconds)", metavar="SPEC[,SPEC...]")
    gateways: int = setting(
        1, "stack: N OpenAI gateway replicas (issue 19); the gateway policies (gateway:kv_aware "
           "unless given) are replayed through gateway 0 alone and as gateway:POLICY@N spread "
           "over all N like a Kubernetes Service (--spread), sharing their view unless "
           "--no-share-routes. --routers N does the same for the Router API (POLICY and "
           "POLICY@N)", metavar="N")
    replicas_first: bool = setting(
        False, "stack --routers/--gateways N: replay POLICY@N before POLICY in run 1 (default: "
               "after); with --repeat the runs alternate the order (ABBA) and the report gives "
               "the replica effect per run and its order-balanced mean (JSON replica_effect)")
    fresh_fleet: bool = setting(
        True, "stack: start a new fleet (etcd, registry, engines, agents, routers) for every "
              "replay, so each starts from the same state; --no-fresh-fleet replays every "
              "policy on the same processes with the caches emptied in between (what the bench "
              "did before s26: the agents' measured prefill rates then carry over, and the "
              "second replay on a fleet gained ~0.006 hit rate). Runs with --fault always "
              "reuse their fleet")
    sim_runs: int = setting(
        0, "stack: afterwards replay the same workload N times in --mode sim with the timing "
           "this stack run measured (arrival and return lag, heartbeat interval; seeds "
           "--seed..) and print whether each policy agrees with the sim's median (hit within "
           "0.01, p50/p90 TTFT within 15 %%; JSON: agreement); 0 = skip", metavar="N")
    quick: bool = setting(
        False, "stack: a smoke run for tests: first 120 requests, 4 nodes, 20 pairs")

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise ConfigError(f"--repeat: {self.repeat} runs; give N >= 1 (1 = one run, no "
                              f"spread)")
        if self.sim_runs < 0:
            raise ConfigError(f"--sim-runs: {self.sim_runs}; give N >= 0 (0 = skip the sim "
                              f"check)")


def stack_settings(args: argparse.Namespace) -> StackSettings:
    """The validated :class:`StackSettings` of parsed flags (:class:`ConfigError` naming the
    flag when one is out of range)."""
    return StackSettings(**value_arguments(StackSettings, args))
