"""Measures the agent's hot path on one core and prints JSON.

``python -m node_agent.perf [--seconds S]``: events/s decoded by the vLLM parser (map and
positional encodings, runs of 1 and 16 blocks), events/s through parser + block map (canonical
hashing and delta bookkeeping), and serialized heartbeat sizes for typical deltas.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from typing import Any

import msgspec

from kvroute.v1 import registry_pb2
from node_agent.block_map import BlockMap
from node_agent.deltas import DeltaLog
from node_agent.parse_vllm import VllmParser

BLOCK = 16
EVENTS_PER_BATCH = 32


def _payloads(blocks_per_event: int, encoding: str, n_batches: int) -> list[bytes]:
    rng = random.Random(1)
    out = []
    h = 1
    for _ in range(n_batches):
        events: list[Any] = []
        parent = None
        for _ in range(EVENTS_PER_BATCH):
            hashes = [rng.getrandbits(64) for _ in range(blocks_per_event)]
            toks = [rng.randrange(50_000) for _ in range(BLOCK * blocks_per_event)]
            if encoding == "map":
                events.append({"type": "BlockStored", "block_hashes": hashes,
                               "parent_block_hash": parent, "token_ids": toks,
                               "block_size": BLOCK, "lora_id": None, "medium": "GPU"})
            else:
                events.append(["BlockStored", hashes, parent, toks, BLOCK, None, "GPU"])
            parent = hashes[-1]
            h += 1
        out.append(msgspec.msgpack.encode([time.time(), events, 0]))
    return out


def _rate(fn: Callable[[bytes], None], payloads: list[bytes], seconds: float) -> float:
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for p in payloads:
            fn(p)
        n += len(payloads) * EVENTS_PER_BATCH
    return n / (time.perf_counter() - t0)


def _heartbeat_bytes(stored: int, removed: int) -> int:
    rng = random.Random(2)
    req = registry_pb2.HeartbeatRequest(
        node_id="node-0123456789", epoch=1_795_597_509_060, used_blocks=30_000,
        evictions_total=1_000_000, queue_depth=3, running=40,
        stored=[rng.getrandbits(64) for _ in range(stored)],
        removed=[rng.getrandbits(64) for _ in range(removed)], delta_seq=12_345)
    return req.ByteSize()


def measure(seconds: float) -> dict[str, Any]:
    """Run every measurement; returns the JSON-able result."""
    res: dict[str, Any] = {"block_size": BLOCK, "events_per_batch": EVENTS_PER_BATCH,
                           "seconds_per_case": seconds, "parse_events_per_s": {},
                           "parse_and_map_events_per_s": {}, "heartbeat_bytes": {}}
    for enc in ("map", "positional"):
        for bpe in (1, 16):
            payloads = _payloads(bpe, enc, 50)
            parser = VllmParser()
            key = f"{enc}_{bpe}_blocks_per_event"

            def parse(p: bytes, parser: VllmParser = parser) -> None:
                parser.parse(p)
            res["parse_events_per_s"][key] = round(_rate(parse, payloads, seconds))

            deltas = DeltaLog()
            bmap = BlockMap(BLOCK, deltas)

            def both(p: bytes, parser: VllmParser = parser, bmap: BlockMap = bmap,
                     deltas: DeltaLog = deltas) -> None:
                batch = parser.parse(p)
                if batch is not None:
                    for ev in batch.events:
                        bmap.apply(ev)
                bmap.clear()
                deltas.reset()
            res["parse_and_map_events_per_s"][key] = round(_rate(both, payloads, seconds))
    for stored, removed in ((0, 0), (1, 0), (100, 100), (1000, 1000), (100_000, 0)):
        res["heartbeat_bytes"][f"stored_{stored}_removed_{removed}"] = _heartbeat_bytes(
            stored, removed)
    big = res["heartbeat_bytes"]["stored_100000_removed_0"]
    base = res["heartbeat_bytes"]["stored_0_removed_0"]
    res["heartbeat_bytes_per_hash"] = round((big - base) / 100_000, 2)
    return res


def main() -> None:
    """CLI entry: print the measurements as JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=1.0, help="duration of each case")
    print(json.dumps(measure(ap.parse_args().seconds), indent=2))


if __name__ == "__main__":
    main()
