"""vLLM scenarios for scripts/record_engine_payloads.py (runs inside the recorder's child).

Drives vLLM's real BlockPool the way its scheduler does: prefix hits through
``get_cached_block`` (capped at ``num_tokens - 1`` tokens, as ``KVCacheManager`` caps them),
``touch``, ``get_new_blocks`` (evicting LRU cached blocks → BlockRemoved), ``cache_full_blocks``
(→ BlockStored with parents, extra_keys, lookahead tokens), ``free_blocks`` in reverse order,
``reset_prefix_cache`` (→ AllBlocksCleared). Every probe's ``engine_hit_tokens`` is what this
pool would reuse for that prompt: the ground truth the replay tests hold kvroute to.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any

BS = 16
TOPIC = "kv-events"


class LoRA:
    """Duck-typed vllm.lora.request.LoRARequest."""

    def __init__(self, name: str, int_id: int) -> None:
        self.lora_name = self.name = name
        self.lora_int_id = self.adapter_id = int_id
        self.lora_path = f"/adapters/{name}"


class _Pos:
    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.length = offset, length


class MM:
    """Duck-typed MultiModalFeatureSpec (identifier + placeholder range)."""

    def __init__(self, identifier: str, offset: int, length: int) -> None:
        self.identifier = identifier
        self.mm_hash = identifier
        self.mm_position = _Pos(offset, length)


class Req:
    """Duck-typed vllm.v1.request.Request: the attributes the block hasher and pool read."""

    def __init__(self, rid: str, tokens: list[int], lora: LoRA | None = None,
                 salt: str | None = None, mm: list[MM] | None = None) -> None:
        self.request_id = rid
        self.all_token_ids = list(tokens)
        self.num_tokens = len(tokens)
        self.block_hashes: list[Any] = []
        self.lora_request = lora
        self.cache_salt = salt
        self.mm_features = mm or []
        self.prompt_embeds = None
        self._prompt_embeds_per_block_hashes: dict[Any, Any] = {}
        self.blocks: list[Any] = []
        self.session_id: str | None = None


def toks(seed: int, n: int, start: int = 0) -> list[int]:
    """Deterministic token ids (distinct per seed)."""
    return [(seed * 7919 + (start + i) * 104729) % 50000 + 100 for i in range(n)]


class Engine:
    """One vLLM KV cache (BlockPool) with its publisher."""

    def __init__(self, mods: dict[str, Any], cap: Any, *, bs: int = BS, n_blocks: int = 24,
                 lookahead: int = 0, topic: str = TOPIC, replay: bool = True,
                 media: tuple[str, ...] = ("GPU",)) -> None:
        ku = mods["vllm/v1/core/kv_cache_utils.py"]
        bp = mods["vllm/v1/core/block_pool.py"]
        ke = mods["vllm/distributed/kv_events.py"]
        hashing = mods["vllm/utils/hashing.py"]
        ku.init_none_hash(hashing.sha256)
        self.ke, self.bs, self.lookahead = ke, bs, lookahead
        params = inspect.signature(bp.BlockPool.__init__).parameters
        self.pools = {}
        for medium in media:
            kw: dict[str, Any] = {}
            if "num_hash_lookahead_tokens" in params:
                kw["num_hash_lookahead_tokens"] = lookahead
            if "medium" in params:
                kw["medium"] = medium
            elif medium != "GPU":
                raise RuntimeError("this vLLM BlockPool has no medium parameter")
            self.pools[medium] = bp.BlockPool(n_blocks, True, bs, True, **kw)
        hparams = inspect.signature(ku.get_request_block_hasher).parameters
        hkw = {"num_hash_lookahead_tokens": lookahead} if "num_hash_lookahead_tokens" in \
            hparams else {}
        if lookahead and not hkw:
            raise RuntimeError("this vLLM has no lookahead hashing")
        self.hasher = ku.get_request_block_hasher(bs, hashing.sha256, **hkw)
        self.cap = cap
        self.pub = ke.ZmqEventPublisher(0, endpoint=cap.pub_ep,
                                        replay_endpoint=cap.replay_ep if replay else None,
                                        topic=topic)

    def _hashes(self, req: Req) -> None:
        req.block_hashes = []
        req.block_hashes.extend(self.hasher(req))

    def hit_blocks(self, req: Req, medium: str = "GPU") -> list[Any]:
        """Cached blocks the engine reuses for ``req`` (capped at num_tokens - 1 tokens)."""
        self._hashes(req)
        pool = self.pools[medium]
        out = []
        for h in req.block_hashes[: (req.num_tokens - 1) // self.bs]:
            b = pool.get_cached_block(h, [0])
            if not b:
                break
            out.append(b[0])
        return out

    def run(self, req: Req, medium: str = "GPU") -> int:
        """Prefill ``req``: reuse hits, allocate, cache its full blocks. Returns hit tokens."""
        pool = self.pools[medium]
        hits = self.hit_blocks(req, medium)
        pool.touch(hits)
        n_alloc = -(-req.num_tokens // self.bs)
        req.blocks = hits + pool.get_new_blocks(n_alloc - len(hits))
        pool.cache_full_blocks(req, req.blocks, len(hits), len(req.block_hashes), self.bs, 0)
        return len(hits) * self.bs

    def finish(self, req: Req, medium: str = "GPU") -> None:
        """Free the request's blocks (tail first in the eviction order, as vLLM does)."""
        self.pools[medium].free_blocks(reversed(req.blocks))

    def publish(self) -> int:
        """Publish one batch with every pool's queued events; returns 1 if sent, else 0."""
        events = []
        for pool in self.pools.values():
            events.extend(pool.take_events())
        if not events:
            return 0
        self.pub.publish(self.ke.KVEventBatch(ts=time.time(), events=events))
        return 1

    def probe(self, name: str, tokens: list[int], lora: LoRA | None = None,
              salt: str | None = None, note: str = "") -> dict[str, Any]:
        """A prompt and what the engine would reuse for it now (per medium)."""
        out: dict[str, Any] = {
            "name": name, "tokens": tokens, "lora_name": lora.lora_name if lora else "",
            "cache_salt": salt or "", "note": note}
        for medium in self.pools:
            key = "engine_hit_tokens" if medium == "GPU" else f"engine_hit_tokens_{medium}"
            out[key] = len(self.hit_blocks(Req("probe", tokens, lora, salt), medium)) * self.bs
        out["engine_block_size"] = self.bs
        return out

    def close(self) -> None:
        """Stop the publisher."""
        self.pub.shutdown()


def record_vllm(rec: Any, mods: dict[str, Any], tmp: Path, version: str) -> None:
    """Every vLLM scenario."""
    from record_engine_payloads import Capture

    newer = version >= "0.30"

    def session(name: str, **kw: Any) -> tuple[Engine, Any]:
        cap = Capture(tmp, name)
        eng = Engine(mods, cap, **kw)
        cap.connect()
        return eng, cap

    def plain_like(name: str, desc: str, int_hashes: bool) -> None:
        os.environ["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] = "1" if int_hashes else "0"
        eng, cap = session(name, n_blocks=16)
        a = Req("a", toks(1, 69))
        b = Req("b", toks(1, 32) + toks(2, 32, 32))
        n = 0
        eng.run(a)
        n += eng.publish()
        eng.run(b)
        n += eng.publish()
        eng.finish(a)
        eng.finish(b)
        c = Req("c", toks(3, 12 * BS))  # needs more free blocks than never-used ones: evicts
        eng.run(c)
        n += eng.publish()
        cap.drain(n)
        cap.replay(1)
        probes = [
            eng.probe("a_plus_one", toks(1, 69)),
            eng.probe("a_64_exact", toks(1, 64), note="last-token recompute: at most 63 tokens"),
            eng.probe("b_prefix", toks(1, 32) + toks(2, 40, 32)),
            eng.probe("c_all", toks(3, 12 * BS + 1)),
            eng.probe("unrelated", toks(9, 80)),
        ]
        eng.close()
        cap.close()
        rec.write(name, desc, cap, {"block_size": BS, "topic": TOPIC, "replay": True,
                                    "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": int(int_hashes)},
                  probes)
        os.environ["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] = "1"

    plain_like("plain", "two prompts sharing 2 blocks, then a third evicting cached blocks; "
               "replay from seq 1 recorded", True)
    plain_like("bytes_hashes", "as plain with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 (32-byte "
               "digests on the wire)", False)

    # --- LoRA, cache salt, both -----------------------------------------------------------
    for name, lora, salt in (("lora", LoRA("sql-adapter", 3), None),
                             ("cache_salt", None, "tenant-7"),
                             ("lora_cache_salt", LoRA("sql-adapter", 3), "tenant-7")):
        eng, cap = session(name)
        a = Req("a", toks(4, 69), lora, salt)
        d = Req("d", toks(5, 40))
        eng.run(a)
        eng.run(d)
        cap.drain(eng.publish())
        probes = [eng.probe("same_adapter_and_salt", toks(4, 69), lora, salt),
                  eng.probe("base_model_same_tokens", toks(4, 69)),
                  eng.probe("base_prompt", toks(5, 40))]
        if salt:
            probes.append(eng.probe("other_salt", toks(4, 69), lora, "tenant-8"))
        if lora:
            probes.append(eng.probe("other_adapter", toks(4, 69), LoRA("chat-adapter", 4), salt))
        eng.close()
        cap.close()
        rec.write(name, f"a prompt under LoRA={lora and lora.lora_name} cache_salt={salt}, "
                  "and a base-model prompt", cap, {"block_size": BS, "topic": TOPIC}, probes)

    # --- multimodal (extra keys the router cannot reproduce) ------------------------------
    eng, cap = session("multimodal")
    mm = [MM("img-7f3a", 20, 10)]
    a = Req("a", toks(6, 69), mm=mm)
    eng.run(a)
    cap.drain(eng.publish())
    probes = [eng.probe("text_only_same_tokens", toks(6, 69),
                        note="blocks from the image on carry mm keys: unmatchable")]
    eng.close()
    cap.close()
    rec.write("multimodal", "an image placeholder inside block 1 (mm extra keys)", cap,
              {"block_size": BS, "topic": TOPIC}, probes)

    # --- engine block 32 under a 16-token registry ----------------------------------------
    eng, cap = session("block32", bs=32)
    a = Req("a", toks(7, 101))
    eng.run(a)
    cap.drain(eng.publish())
    probes = [eng.probe("a_all", toks(7, 101)),
              eng.probe("shares_48_tokens", toks(7, 48) + toks(8, 40, 48),
                        note="3 registry blocks match, the engine reuses one 32-token block"),
              eng.probe("a_64_exact", toks(7, 64), note="last-token recompute with 32 blocks"),
              eng.probe("a_96_exact", toks(7, 96))]
    eng.close()
    cap.close()
    rec.write("block32", "engine block 32, kvroute registry block 16", cap,
              {"block_size": 32, "topic": TOPIC}, probes)

    # --- spec-decode lookahead hashing (0.33) ---------------------------------------------
    if newer:
        eng, cap = session("lookahead", lookahead=1)
        a = Req("a", toks(10, 69))
        eng.run(a)
        cap.drain(eng.publish())
        probes = [eng.probe("a_all", toks(10, 69)),
                  eng.probe("a_65", toks(10, 65)),
                  eng.probe("a_64_exact", toks(10, 64))]
        eng.close()
        cap.close()
        rec.write("lookahead", "num_hash_lookahead_tokens=1 (EAGLE drafter): each hash also "
                  "covers the next token; lookahead_token_ids published", cap,
                  {"block_size": BS, "topic": TOPIC, "num_hash_lookahead_tokens": 1}, probes)

        # --- offloaded blocks (a CPU-medium pool next to the GPU one) ---------------------
        eng, cap = session("offloaded", media=("GPU", "CPU"))
        a = Req("a", toks(11, 69))
        eng.run(a)
        eng.run(Req("a_cpu", toks(11, 69)), "CPU")
        eng.run(Req("e_cpu", toks(12, 53)), "CPU")
        cap.drain(eng.publish())
        probes = [eng.probe("on_gpu_and_cpu", toks(11, 69)),
                  eng.probe("cpu_only", toks(12, 53))]
        eng.close()
        cap.close()
        rec.write("offloaded", "a prompt on GPU and CPU, another only on CPU (BlockPool "
                  "medium=CPU, as the offloading connector reports it)", cap,
                  {"block_size": BS, "topic": TOPIC}, probes)

        # --- tier moves: evicted from the GPU but kept on CPU; evicted from CPU ----------
        eng, cap = session("offload_evict", media=("GPU", "CPU"), n_blocks=12)
        a_toks, d_toks = toks(16, 69), toks(17, 53)
        n = 0
        for req, medium in ((Req("d_cpu", d_toks), "CPU"), (Req("a_cpu", a_toks), "CPU"),
                            (Req("a", a_toks), "GPU")):
            eng.run(req, medium)
            eng.finish(req, medium)
            n += eng.publish()
        # 10 new GPU blocks with 6 never used: evicts a's last 4 (freed tail first) from the
        # GPU while the CPU copy stays; 6 new CPU blocks evict d's blocks from the CPU
        eng.run(Req("b", toks(18, 10 * BS)))
        eng.run(Req("e_cpu", toks(19, 6 * BS)), "CPU")
        n += eng.publish()
        cap.drain(n)
        probes = [eng.probe("a_gpu_then_cpu", a_toks,
                            note="block 0 on GPU, blocks 1-3 evicted from GPU, on CPU"),
                  eng.probe("b_gpu", toks(18, 10 * BS + 1)),
                  eng.probe("d_evicted_from_cpu", d_toks,
                            note="blocks evicted from the CPU pool (BlockRemoved medium=CPU); "
                                 "what the CPU pool still holds is the engine's own count"),
                  eng.probe("e_cpu_only", toks(19, 6 * BS + 1))]
        eng.close()
        cap.close()
        rec.write("offload_evict", "GPU evictions of blocks the CPU tier keeps (a tier move: "
                  "GPU credit then CPU credit) and CPU evictions (BlockRemoved medium=CPU)",
                  cap, {"block_size": BS, "topic": TOPIC}, probes)

    # --- AllBlocksCleared -----------------------------------------------------------------
    eng, cap = session("cleared")
    a = Req("a", toks(13, 69))
    eng.run(a)
    n = eng.publish()
    eng.finish(a)
    pool = eng.pools["GPU"]
    assert pool.reset_prefix_cache()
    n += eng.publish()
    eng.run(Req("f", toks(14, 40)))
    n += eng.publish()
    cap.drain(n)
    probes = [eng.probe("a_after_clear", toks(13, 69)), eng.probe("f", toks(14, 40))]
    eng.close()
    cap.close()
    rec.write("cleared", "reset_prefix_cache between two prompts", cap,
              {"block_size": BS, "topic": TOPIC}, probes)

    # --- late join (engine busy before the agent starts) ----------------------------------
    eng, cap = session("late_join")
    eng.run(Req("a", toks(15, 69)))
    n = eng.publish()
    eng.run(Req("b", toks(16, 40)))
    n += eng.publish()
    cap.drain(n)
    cap.replay(0)
    probes = [eng.probe("a", toks(15, 69)), eng.probe("b", toks(16, 40))]
    eng.close()
    cap.close()
    rec.write("late_join", "two batches published before any agent subscribed, then idle; "
              "the replay answer from seq 0 recorded", cap,
              {"block_size": BS, "topic": TOPIC, "replay": True}, probes)

    # --- engine restart, with and without a replay socket ---------------------------------
    for name, replay in (("restart_replay", True), ("restart_no_replay", False)):
        cap = Capture(tmp, name)
        eng = Engine(mods, cap, replay=replay)
        cap.connect()
        eng.run(Req("old", toks(17, 69)))
        cap.drain(eng.publish())
        probe_old = toks(17, 69)
        eng.close()
        cap.incarnation = 1
        eng = Engine(mods, cap, replay=replay)  # a new process: new pool, seq from 0
        cap.sub.close(linger=0)
        cap.connect()  # the recorder sees every batch; the replay test drops the first
        eng.run(Req("first", toks(18, 40)))
        n = eng.publish()
        eng.run(Req("second", toks(19, 40)))
        n += eng.publish()
        cap.drain(n)
        if replay:
            cap.replay(0)
        probes = [eng.probe("before_restart", probe_old), eng.probe("first_batch", toks(18, 40)),
                  eng.probe("second_batch", toks(19, 40))]
        eng.close()
        cap.close()
        rec.write(name, "engine restarted (new incarnation, seq from 0); its first batch is "
                  "published before a subscriber reconnects", cap,
                  {"block_size": BS, "topic": TOPIC, "replay": replay}, probes)

    # --- topic mismatch -------------------------------------------------------------------
    eng, cap = session("wrong_topic", topic="kv@10.0.0.5@conf-model")
    eng.run(Req("a", toks(20, 69)))
    cap.drain(eng.publish())
    probes = [eng.probe("a", toks(20, 69))]
    eng.close()
    cap.close()
    rec.write("wrong_topic", "engine topic kv@10.0.0.5@conf-model (llm-d style); the agent is "
              "configured with --topic kv-events", cap,
              {"block_size": BS, "topic": "kv@10.0.0.5@conf-model"}, probes)
