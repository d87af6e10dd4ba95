"""Older wire shapes for scripts/record_engine_payloads.py: vLLM 0.9.0 (positional events,
2-element batches ``[ts, events]``, ``builtin`` Python-hash block ids, replies ``[seq, payload]``)
and SGLang 0.4.10.post2 (positional events, one event per page, unchained ``hash(tuple(page))``
ids, and ``parent_block_hash = hash(())`` for a node under the radix root).

vLLM: its real BlockPool (``cache_full_blocks`` with its then signature), request hasher
(``hash_request_tokens``) and publisher. SGLang: its real ``RadixCache`` (insert, node split,
evict) with list values instead of tensors, and its publisher; probes use its real
``_match_prefix_helper`` over the first ``len - 1`` tokens, page-aligned, as its scheduler does.

vLLM 0.9.0's ``builtin`` block ids change from one recording run to the next (they hash a tuple
holding ``None``, whose hash is its address before Python 3.12): the very non-reproducibility
the agent is built for; the tests never depend on engine ids.
"""

from __future__ import annotations

import hashlib
import pickle
import time
import types
from pathlib import Path
from typing import Any

BS = 16
TOPIC = "kv-events"

STUBS_VLLM_090 = {
    "vllm": "package shell (the real __init__ imports torch)",
    "vllm.config": "KVEventsConfig / VllmConfig placeholders (imports torch)",
    "vllm.logger": "init_logger = logging.getLogger",
    "vllm.utils": "GiB_bytes and sha256 (pickle + hashlib, as the real one); the module imports "
    "torch",
    "vllm.v1.kv_cache_interface": "spec placeholders (imports torch)",
    "vllm.v1.metrics.stats": "PrefixCacheStats placeholder",
    "vllm.v1.request": "Request placeholder; the recorder passes a duck-typed request",
}
REAL_VLLM_090 = ["vllm/distributed/kv_events.py", "vllm/v1/core/kv_cache_utils.py",
                 "vllm/v1/core/block_pool.py"]
STUBS_SGLANG_0410 = {
    "sglang": "package shell (the real __init__ imports torch)",
    "torch": "module placeholder: RadixCache imports it; with list values and no allocator "
    "device the recorded paths (insert, split, evict, _match_prefix_helper) never call it",
    "sglang.srt.mem_cache.allocator": "BaseTokenToKVPoolAllocator placeholder (free() no-op)",
    "sglang.srt.mem_cache.base_prefix_cache": "BasePrefixCache / MatchResult placeholders",
    "sglang.srt.mem_cache.memory_pool": "ReqToTokenPool placeholder (imports torch)",
}
REAL_SGLANG_0410 = ["sglang/srt/disaggregation/kv_events.py",
                    "sglang/srt/mem_cache/radix_cache.py"]


class _P:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass


def toks(seed: int, n: int, start: int = 0) -> list[int]:
    """Deterministic token ids (distinct per seed)."""
    return [(seed * 7919 + (start + i) * 104729) % 50000 + 100 for i in range(n)]


# ----------------------------------------------------------------------------------- vLLM
def _stub_vllm_090() -> None:
    import logging

    from record_engine_payloads import _module

    for pkg in ("vllm", "vllm.distributed", "vllm.v1", "vllm.v1.core", "vllm.v1.metrics"):
        _module(pkg)
    _module("vllm.config", KVEventsConfig=_P, VllmConfig=_P)
    _module("vllm.logger", init_logger=logging.getLogger)

    def sha256(x: Any) -> int:
        return int.from_bytes(hashlib.sha256(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL))
                              .digest(), byteorder="big")

    _module("vllm.utils", GiB_bytes=1 << 30, sha256=sha256)
    _module("vllm.v1.kv_cache_interface", FullAttentionSpec=_P, KVCacheConfig=_P,
            KVCacheSpec=_P, KVCacheTensor=_P, SlidingWindowSpec=_P, KVCacheGroupSpec=_P,
            __getattr__=lambda n: _P)
    _module("vllm.v1.metrics.stats", PrefixCacheStats=_P)
    _module("vllm.v1.request", Request=_P)


class Req090:
    """Duck-typed vllm 0.9.0 Request."""

    def __init__(self, rid: str, tokens: list[int]) -> None:
        self.request_id = rid
        self.all_token_ids = list(tokens)
        self.num_tokens = len(tokens)
        self.lora_request = None
        self.cache_salt = None
        self.mm_positions: list[Any] = []
        self.mm_hashes: list[Any] = []
        self.blocks: list[Any] = []


def record_vllm_090(rec: Any, tmp: Path) -> None:
    """vLLM 0.9.0 scenarios."""
    from record_engine_payloads import REAL_LEGACY, Capture, _load

    _stub_vllm_090()
    m = {rel: _load(tmp / "src", rel) for rel in REAL_LEGACY["vllm-0.9.0"]}
    ku, bp, ke = (m["vllm/v1/core/kv_cache_utils.py"], m["vllm/v1/core/block_pool.py"],
                  m["vllm/distributed/kv_events.py"])

    class Engine:
        def __init__(self, cap: Any) -> None:
            self.pool = bp.BlockPool(24, True, True)
            self.pub = ke.ZmqEventPublisher(endpoint=cap.pub_ep, replay_endpoint=cap.replay_ep,
                                            topic=TOPIC)

        def hits(self, req: Req090) -> list[Any]:
            hashes = ku.hash_request_tokens(hash, BS, req)
            out = []
            for h in hashes[: (req.num_tokens - 1) // BS]:
                b = self.pool.get_cached_block(h)
                if b is None:
                    break
                out.append(b)
            return out

        def run(self, req: Req090) -> None:
            hashes = ku.hash_request_tokens(hash, BS, req)
            hit = self.hits(req)
            self.pool.touch(hit)
            req.blocks = hit + self.pool.get_new_blocks(-(-req.num_tokens // BS) - len(hit))
            self.pool.cache_full_blocks(req, req.blocks, hashes, len(hit),
                                        req.num_tokens // BS, BS, hash)

        def publish(self) -> int:
            events = self.pool.take_events()
            if not events:
                return 0
            self.pub.publish(ke.KVEventBatch(ts=time.time(), events=events))
            return 1

        def probe(self, name: str, tokens: list[int]) -> dict[str, Any]:
            return {"name": name, "tokens": tokens, "lora_name": "", "cache_salt": "",
                    "note": "", "engine_block_size": BS,
                    "engine_hit_tokens": len(self.hits(Req090("p", tokens))) * BS}

    for name, late in (("plain", False), ("late_join", True)):
        cap = Capture(tmp, name)
        eng = Engine(cap)
        cap.connect()
        a, b = Req090("a", toks(1, 69)), Req090("b", toks(1, 32) + toks(2, 32, 32))
        eng.run(a)
        n = eng.publish()
        eng.run(b)
        n += eng.publish()
        eng.pool.free_blocks(reversed(a.blocks))
        eng.pool.free_blocks(reversed(b.blocks))
        eng.run(Req090("c", toks(3, 18 * BS)))  # evicts cached blocks
        n += eng.publish()
        cap.drain(n)
        cap.replay(0 if late else 1)
        probes = [eng.probe("a_plus_one", toks(1, 69)), eng.probe("a_64_exact", toks(1, 64)),
                  eng.probe("b_prefix", toks(1, 32) + toks(2, 40, 32)),
                  eng.probe("c_all", toks(3, 18 * BS + 1))]
        eng.pub.shutdown()
        cap.close()
        rec.write(name, "vLLM 0.9.0 (2-element batches, builtin hash ids): two prompts sharing 2 "
                  "blocks, a third evicting" + (", agent joins late" if late else ""), cap,
                  {"block_size": BS, "topic": TOPIC, "replay": True, "hash": "builtin"}, probes)


# --------------------------------------------------------------------------------- SGLang
def _stub_sglang_0410() -> None:
    from record_engine_payloads import _module

    for pkg in ("sglang", "sglang.srt", "sglang.srt.disaggregation", "sglang.srt.mem_cache",
                "sglang.srt.managers"):
        _module(pkg)
    _module("torch", Tensor=_P, device=lambda *a: None)

    class Alloc:
        device = None

        def free(self, *_a: Any) -> None:
            pass

    _module("sglang.srt.mem_cache.allocator", BaseTokenToKVPoolAllocator=Alloc)
    _module("sglang.srt.mem_cache.base_prefix_cache", BasePrefixCache=object, MatchResult=_P)
    _module("sglang.srt.mem_cache.memory_pool", ReqToTokenPool=_P)


def record_sglang_0410(rec: Any, tmp: Path) -> None:
    """SGLang 0.4.10.post2 scenarios."""
    from record_engine_payloads import REAL_LEGACY, Capture, _load

    _stub_sglang_0410()
    m = {rel: _load(tmp / "src", rel) for rel in REAL_LEGACY["sglang-0.4.10.post2"]}
    ke, rc = m["sglang/srt/disaggregation/kv_events.py"], m["sglang/srt/mem_cache/radix_cache.py"]
    alloc = sys_module("sglang.srt.mem_cache.allocator").BaseTokenToKVPoolAllocator()

    class Engine:
        def __init__(self, cap: Any, page: int) -> None:
            self.page = page
            self.cache = rc.RadixCache(None, alloc, page_size=page, disable=False,
                                       enable_kv_cache_events=True)
            self.cache.kv_event_queue.clear()  # reset() recorded AllBlocksCleared at start
            self.pub = ke.ZmqEventPublisher(0, endpoint=cap.pub_ep,
                                            replay_endpoint=cap.replay_ep, topic=TOPIC)

        def publish(self) -> int:
            events, self.cache.kv_event_queue = self.cache.kv_event_queue, []
            if not events:
                return 0
            self.pub.publish(ke.KVEventBatch(ts=time.time(), events=events))
            return 1

        def probe(self, name: str, tokens: list[int]) -> dict[str, Any]:
            key = tokens[: len(tokens) - 1]
            key = key[: len(key) // self.page * self.page]
            value, _node = self.cache._match_prefix_helper(self.cache.root_node, key)
            self.cache.kv_event_queue.clear()  # a probe's node split is not published
            return {"name": name, "tokens": tokens, "lora_name": "", "cache_salt": "",
                    "note": "", "engine_block_size": self.page,
                    "engine_hit_tokens": sum(len(v) for v in value)}

    for name, page in (("plain", BS), ("page1", 1)):
        cap = Capture(tmp, name)
        eng = Engine(cap, page)
        cap.connect()
        eng.cache.insert(toks(1, 64))
        eng.cache.insert(toks(1, 64) + toks(2, 32, 64))
        n = eng.publish()
        eng.cache.insert(toks(1, 32) + toks(3, 32, 32))  # splits node A at 32 tokens
        eng.cache.insert(toks(4, 48))
        n += eng.publish()
        eng.cache.evict(32)
        n += eng.publish()
        cap.drain(n)
        cap.replay(1)
        probes = [eng.probe("a_b_plus_one", toks(1, 64) + toks(2, 33, 64)),
                  eng.probe("a_plus_one", toks(1, 65)), eng.probe("a_64_exact", toks(1, 64)),
                  eng.probe("split_branch", toks(1, 32) + toks(3, 33, 32)),
                  eng.probe("d", toks(4, 49))]
        eng.pub.shutdown()
        cap.close()
        rec.write(name, f"SGLang 0.4.10.post2 RadixCache page {page}: inserts, a node split, "
                  "an eviction", cap, {"page_size": page, "topic": TOPIC, "replay": True},
                  probes)


def sys_module(name: str) -> types.ModuleType:
    """A module from sys.modules."""
    import sys
    return sys.modules[name]
