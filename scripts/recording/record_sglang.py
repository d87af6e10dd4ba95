"""SGLang scenarios for scripts/record_engine_payloads.py (runs inside the recorder's child).

Events come from SGLang's real ``KVCacheEventRecorder`` (mem_cache/events.py: one BlockStored per
page, consecutive pages merged, a partial last page on its own, bigram pages as pairs, LoRA
names, cache salt, media) fed with radix-tree nodes shaped like SGLang's ``TreeNode``, and go out
through SGLang's real ``ZmqEventPublisher``. ``engine_hit_tokens`` of a probe comes from the
recorder's model of ``RadixCache.match_prefix`` (the longest cached prefix in the same
namespace, page-aligned, over the first ``len - 1`` tokens), not from SGLang code: the radix
cache itself imports torch.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import sys
import time
import types
from pathlib import Path
from typing import Any

PAGE = 16
TOPIC = "kv-events"


def _stub_and_load(src: Path) -> dict[str, Any]:
    from record_engine_payloads import _load, _module

    for pkg in ("sglang", "sglang.srt", "sglang.srt.disaggregation", "sglang.srt.mem_cache",
                "sglang.srt.utils"):
        _module(pkg)
    _module("sglang.srt.runtime_context", get_parallel=lambda: types.SimpleNamespace(
        pp_rank=0, attn_tp_rank=0, attn_cp_rank=0))

    class NetworkAddress:
        def __init__(self, host: str, port: int) -> None:
            self.host, self.port, self.is_ipv6 = host, port, False

        @classmethod
        def parse(cls, s: str) -> NetworkAddress:
            host, _, port = s.rpartition(":")
            return cls(host, int(port))

        def to_tcp(self) -> str:
            return f"tcp://{self.host}:{self.port}"

    _module("sglang.srt.utils.network", NetworkAddress=NetworkAddress)

    def get_native_hash(token_ids: Any, prior_digest: bytes | None,
                        page_size: int | None = None) -> str | list[str]:
        # Stand-in for the JIT-compiled C++ chain: SHA-256 over prior digest + page tokens.
        raw = list(getattr(token_ids, "token_ids", token_ids))
        n = len(token_ids)
        pages = [raw[i:min(i + (page_size or n), n) + (1 if getattr(
            token_ids, "is_bigram", False) else 0)] for i in range(0, n, page_size or n or 1)]
        out, prior = [], prior_digest or b""
        for page in pages:
            d = hashlib.sha256(prior + b"".join(int(t).to_bytes(8, "little", signed=True)
                                                for t in page)).digest()
            out.append(d.hex())
            prior = d
        return out if page_size else (out[-1] if out else "")

    # the wheel's mem_cache/utils.py functions the recorder needs, without its torch imports
    utils_src = (src / "sglang/srt/mem_cache/utils.py").read_text()
    tree = ast.parse(utils_src)
    wanted = {"get_hash_str", "storage_namespace_seed", "get_storage_hash_str",
              "hash_str_to_int64", "compute_node_hash_values", "compute_node_event_hash_values"}
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    mod = _module("sglang.srt.mem_cache.utils")
    ns = mod.__dict__
    ns.update({"hashlib": hashlib, "Any": Any, "List": list, "Optional": Any,
               "get_native_hash": get_native_hash})
    exec(compile(ast.Module(body=body, type_ignores=[]), "sglang/srt/mem_cache/utils.py",
                 "exec"), ns)
    logging.getLogger("sglang").setLevel(logging.WARNING)
    ke = _load(src, "sglang/srt/disaggregation/kv_events.py")
    ev = _load(src, "sglang/srt/mem_cache/events.py")
    return {"kv_events": ke, "events": ev}


class Key:
    """Duck-typed RadixKey."""

    def __init__(self, tokens: list[int], extra_key: str | None = None,
                 cache_salt: str | None = None, bigram: bool = False) -> None:
        self.token_ids = tokens
        self.extra_key, self.cache_salt, self.is_bigram = extra_key, cache_salt, bigram

    def __len__(self) -> int:
        return len(self.token_ids) - 1 if self.is_bigram else len(self.token_ids)


class Node:
    """Duck-typed TreeNode."""

    def __init__(self, key: Key, parent: Node | None) -> None:
        self.key, self.parent = key, parent
        self.hash_value: list[str] | None = [] if parent is None else None
        self.event_hash_value: list[str] | None = [] if parent is None else None

    def path_tokens(self) -> list[int]:
        """Logical tokens from the root to the end of this node."""
        if self.parent is None:
            return []
        return self.parent.path_tokens() + self.key.token_ids[:len(self.key)]


def toks(seed: int, n: int, start: int = 0) -> list[int]:
    """Deterministic token ids (distinct per seed)."""
    return [(seed * 7919 + (start + i) * 104729) % 50000 + 100 for i in range(n)]


class Engine:
    """An SGLang radix cache's event side: recorder + publisher + a model of its contents."""

    def __init__(self, m: dict[str, Any], cap: Any, *, page: int = PAGE, topic: str = TOPIC,
                 replay: bool = True) -> None:
        self.m, self.page, self.cap = m, page, cap
        self.names = m["events"].KvEventLoraNames()
        self.rec = m["events"].KVCacheEventRecorder(enabled=True, page_size=page,
                                                    lora_names=self.names)
        self.pub = m["kv_events"].ZmqEventPublisher(
            0, endpoint=cap.pub_ep, replay_endpoint=cap.replay_ep if replay else None,
            topic=topic)
        self.root = Node(Key([]), None)
        self.cached: dict[tuple[Any, ...], dict[str, set[int]]] = {}

    def lora(self, name: str) -> str:
        """Register an adapter; returns the request's extra_key (ends with the lora id)."""
        lora_id = hashlib.md5(name.encode()).hexdigest()
        extra_key = f"ns-{lora_id}"
        self.names.register(types.SimpleNamespace(extra_key=extra_key, lora_id=lora_id), name)
        return extra_key

    def store(self, parent: Node | None, tokens: list[int], *, extra_key: str | None = None,
              salt: str | None = None, bigram: bool = False, medium: Any = None,
              lora_name: str = "") -> Node:
        """Insert a node under ``parent`` (root if None) and record its store."""
        raw = [*tokens, tokens[-1] + 1] if bigram else tokens
        node = Node(Key(raw, extra_key, salt, bigram), parent or self.root)
        self.rec.record_store(node, medium)
        ns = (lora_name, salt or "")
        med = str(getattr(medium, "value", medium) or "GPU")
        path = node.path_tokens()
        full = len(path) - len(path) % self.page
        for n in range(self.page, full + 1, self.page):
            self.cached.setdefault(ns, {}).setdefault(med, set()).add(hash(tuple(path[:n])))
        return node

    def remove(self, node: Node, medium: Any = None) -> None:
        """Evict a leaf node and record it."""
        self.rec.record_remove(node, medium)
        ns = (self.names.get(node.key.extra_key) or "", node.key.cache_salt or "")
        med = str(getattr(medium, "value", medium) or "GPU")
        path = node.path_tokens()
        start = len(node.parent.path_tokens()) if node.parent else 0
        for n in range(start + self.page, len(path) + 1, self.page):
            self.cached.get(ns, {}).get(med, set()).discard(hash(tuple(path[:n])))

    def publish(self) -> int:
        """Publish the recorder's queued events as one batch."""
        events = self.rec.take()
        if not events:
            return 0
        self.pub.publish(self.m["kv_events"].KVEventBatch(ts=time.time(), events=events))
        return 1

    def probe(self, name: str, tokens: list[int], lora_name: str = "", salt: str = "",
              note: str = "") -> dict[str, Any]:
        """A prompt and the page-aligned prefix the radix cache would reuse (per medium)."""
        out: dict[str, Any] = {"name": name, "tokens": tokens, "lora_name": lora_name,
                               "cache_salt": salt, "note": note, "engine_block_size": self.page}
        for med, held in self.cached.get((lora_name, salt), {}).items():
            hit = 0
            for n in range(self.page, len(tokens), self.page):  # over the first len-1 tokens
                if hash(tuple(tokens[:n])) not in held:
                    break
                hit = n
            out["engine_hit_tokens" if med == "GPU" else f"engine_hit_tokens_{med}"] = hit
        out.setdefault("engine_hit_tokens", 0)
        return out

    def close(self) -> None:
        """Stop the publisher."""
        self.pub.shutdown()


def record_sglang(rec: Any, tmp: Path, version: str) -> None:
    """Every SGLang scenario."""
    from record_engine_payloads import Capture

    m = _stub_and_load(tmp / "src")
    medium = m["kv_events"].StorageMedium

    def session(name: str, **kw: Any) -> tuple[Engine, Any]:
        cap = Capture(tmp, name)
        eng = Engine(m, cap, **kw)
        cap.connect()
        return eng, cap

    def done(name: str, desc: str, eng: Engine, cap: Any, n: int, probes: list[Any],
             config: dict[str, Any]) -> None:
        cap.drain(n)
        if config.get("replay_from") is not None:
            cap.replay(config["replay_from"])
        eng.close()
        cap.close()
        rec.write(name, desc, cap, {"page_size": eng.page, "topic": TOPIC, **config}, probes)

    # plain: a tree A(64) -> B(32), C(48); then B evicted
    eng, cap = session("plain")
    a = eng.store(None, toks(1, 64))
    b = eng.store(a, toks(2, 32, 64))
    n = eng.publish()
    eng.store(None, toks(3, 48))
    n += eng.publish()
    eng.remove(b)
    n += eng.publish()
    probes = [eng.probe("a_b_plus_one", toks(1, 64) + toks(2, 33, 64)),
              eng.probe("a_plus_one", toks(1, 65)),
              eng.probe("a_64_exact", toks(1, 64)),
              eng.probe("c", toks(3, 49)),
              eng.probe("unrelated", toks(9, 80))]
    done("plain", "radix nodes A(64)->B(32) and C(48) stored, then B evicted", eng, cap, n,
         probes, {"replay_from": 1})

    # page size 1 (SGLang's default): one-token pages, merged into runs
    eng, cap = session("page1", page=1)
    a = eng.store(None, toks(4, 70))
    n = eng.publish()
    probes = [eng.probe("a_all", toks(4, 71)), eng.probe("a_70_exact", toks(4, 70)),
              eng.probe("shares_40", toks(4, 40) + toks(5, 30, 40))]
    done("page1", "page_size 1: a 70-token prompt (70 one-token pages in one event)", eng, cap,
         n, probes, {})

    # LoRA and cache salt
    for name, lora, salt in (("lora", "sql-adapter", None), ("cache_salt", None, "tenant-7"),
                             ("lora_cache_salt", "sql-adapter", "tenant-7")):
        eng, cap = session(name)
        extra = eng.lora(lora) if lora else None
        eng.store(None, toks(6, 64), extra_key=extra, salt=salt, lora_name=lora or "")
        eng.store(None, toks(7, 48))
        n = eng.publish()
        probes = [eng.probe("same_adapter_and_salt", toks(6, 65), lora or "", salt or ""),
                  eng.probe("base_model_same_tokens", toks(6, 65)),
                  eng.probe("base_prompt", toks(7, 49))]
        done(name, f"a node under LoRA={lora} cache_salt={salt} and a base-model node", eng,
             cap, n, probes, {})

    # EAGLE bigram pages
    eng, cap = session("bigram")
    eng.store(None, toks(8, 64), bigram=True)
    n = eng.publish()
    probes = [eng.probe("a_plus_one", toks(8, 65)), eng.probe("a_64_exact", toks(8, 64))]
    done("bigram", "EAGLE bigram radix key: token_ids are [t_j, t_j+1] pairs", eng, cap, n,
         probes, {})

    # partial last page
    eng, cap = session("partial_page")
    eng.store(None, toks(10, 69))
    n = eng.publish()
    probes = [eng.probe("a_all", toks(10, 70)), eng.probe("a_69_exact", toks(10, 69))]
    done("partial_page", "an unaligned 69-token node: 4 full pages merged, then a 5-token page "
         "as its own event", eng, cap, n, probes, {})

    # offloaded tiers
    eng, cap = session("offloaded")
    a = eng.store(None, toks(11, 64))
    eng.store(None, toks(11, 64), medium=medium.CPU)
    eng.store(None, toks(12, 48), medium=medium.CPU)
    eng.store(None, toks(13, 32), medium=medium.DISK)
    n = eng.publish()
    probes = [eng.probe("on_gpu_and_cpu", toks(11, 65)), eng.probe("cpu_only", toks(12, 49)),
              eng.probe("disk_only", toks(13, 33))]
    done("offloaded", "GPU, CPU_PINNED and DISK stores (HiCache tiers)", eng, cap, n, probes, {})

    # tier moves: a node's tail evicted from the GPU but backed up on the host; a DISK store
    # removed again (BlockRemoved with medium DISK)
    eng, cap = session("offload_evict")
    a_toks, d_toks = toks(16, 64), toks(17, 48)
    a1 = eng.store(None, a_toks[:32])
    a2 = eng.store(a1, a_toks[32:])
    h1 = eng.store(None, a_toks[:32], medium=medium.CPU)
    eng.store(h1, a_toks[32:], medium=medium.CPU)
    n = eng.publish()
    eng.remove(a2)  # device eviction of the tail: it stays on the host
    d = eng.store(None, d_toks, medium=medium.DISK)
    n += eng.publish()
    eng.remove(d, medium=medium.DISK)
    n += eng.publish()
    probes = [eng.probe("a_gpu_then_cpu", [*a_toks, 1],
                        note="pages 0-1 on GPU, pages 2-3 evicted from GPU, on the host"),
              eng.probe("d_removed_from_disk", [*d_toks, 1])]
    done("offload_evict", "a device eviction of pages the host tier keeps (a tier move: GPU "
         "credit then CPU credit), and a DISK removal", eng, cap, n, probes, {})

    # late join and wrong topic, as for vLLM
    eng, cap = session("late_join")
    eng.store(None, toks(14, 64))
    n = eng.publish()
    eng.store(None, toks(15, 48))
    n += eng.publish()
    probes = [eng.probe("a", toks(14, 65)), eng.probe("b", toks(15, 49))]
    done("late_join", "two batches before any agent subscribed; replay from 0 recorded", eng,
         cap, n, probes, {"replay_from": 0})

    eng, cap = session("wrong_topic", topic="kv@10.0.0.5@conf-model")
    eng.store(None, toks(16, 64))
    n = eng.publish()
    probes = [eng.probe("a", toks(16, 65))]
    done("wrong_topic", "engine topic kv@10.0.0.5@conf-model, agent --topic kv-events", eng, cap,
         n, probes, {"topic": "kv@10.0.0.5@conf-model"})
    del sys.modules["sglang.srt.mem_cache.utils"]
