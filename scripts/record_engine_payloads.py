#!/usr/bin/env python3
"""Record KV-event payloads with the engines' OWN code (run by hand when a version is added).

    python scripts/record_engine_payloads.py --download          # pip download --no-deps
    python scripts/record_engine_payloads.py --wheels /tmp/kvroute-wheels

For each pinned engine (vLLM 0.33.0, vLLM 0.23.0, SGLang 0.5.23) a child process extracts the
engine's event modules from its wheel, puts them on ``sys.modules`` under their real names, and
drives them: vLLM's real ``BlockPool`` (``cache_full_blocks``, eviction, ``reset_prefix_cache``)
with its real request block hasher and ``BlockStored``/``BlockRemoved``/``AllBlocksCleared``;
SGLang's real ``KVCacheEventRecorder`` (page merging, partial pages, bigram pages, LoRA names,
cache salt, media). Batches go through each engine's real ``ZmqEventPublisher`` (msgspec
encoder, sequence counter, replay ROUTER) on ipc:// sockets; a SUB and a DEALER capture the
frames exactly as a subscriber receives them.

Only modules that would import torch (or other heavy or compiled code) at import time are
replaced; every replacement is listed in ``STUBS_VLLM`` / ``STUBS_SGLANG`` and in each
scenario's provenance. The wheels are never committed; CI only replays the recorded files.

Output: ``tests/golden/engine_events/<engine>/<scenario>.msgpack`` (live and replay frames) and
``<scenario>.json`` (provenance: package, version, wheel sha256, scenario, stubs, and probes:
prompts with the engine's own prefix-cache hit computed by the engine code).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path
from typing import Any

ENGINES = {
    "vllm-0.33.0": ("vllm", "0.33.0"),
    "vllm-0.23.0": ("vllm", "0.23.0"),
    "vllm-0.9.0": ("vllm", "0.9.0"),
    "sglang-0.5.23": ("sglang", "0.5.23"),
    "sglang-0.4.10.post2": ("sglang", "0.4.10.post2"),
}
REAL_LEGACY = {
    "vllm-0.9.0": ["vllm/distributed/kv_events.py", "vllm/v1/core/kv_cache_utils.py",
                   "vllm/v1/core/block_pool.py"],
    "sglang-0.4.10.post2": ["sglang/srt/disaggregation/kv_events.py",
                            "sglang/srt/mem_cache/radix_cache.py"],
}
"""Older wire shapes (scripts/recording/record_legacy.py): real files loaded per engine."""
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "golden" / "engine_events"

STUBS_VLLM = {
    "vllm": "package shell (the real __init__ imports torch)",
    "vllm.config": "VllmConfig placeholder class (the real package imports torch/transformers)",
    "vllm.config.utils": "`config` decorator = dataclasses.dataclass (real one uses pydantic)",
    "vllm.logger": "init_logger = logging.getLogger (real one pulls vllm.logging_utils)",
    "vllm.multimodal.utils": "get_mm_features_in_window (real module imports torch/PIL)",
    "vllm.utils.network_utils": "get_ip/get_tcp_uri/... (only used for tcp://*:0 binds)",
    "vllm.utils.mem_utils": "format_gib (0.23; imports torch)",
    "vllm.utils.torch_utils": "get_dtype_size (0.23; imports torch)",
    "vllm.v1.kv_cache_interface": "KVCacheSpec classes as placeholders (imports torch)",
    "vllm.v1.kv_cache_spec_registry": "placeholder registry (imports torch)",
    "vllm.v1.request": "Request placeholder; the recorder passes a duck-typed request",
    "vllm.v1.utils": "tensor_data (torch; only for prompt embeds)",
    "vllm.v1.core.kv_cache_metrics": "KVCacheMetricsCollector placeholder (metrics off)",
    "cbor2": "not installed; only sha256_cbor uses it, the recorder hashes with sha256",
}
REAL_VLLM = ["vllm/envs.py", "vllm/utils/math_utils.py", "vllm/utils/hashing.py",
             "vllm/config/kv_events.py", "vllm/v1/core/kv_cache_utils.py",
             "vllm/distributed/kv_events.py", "vllm/v1/core/block_pool.py"]
STUBS_SGLANG = {
    "sglang": "package shell (the real __init__ imports torch)",
    "sglang.srt.runtime_context": "get_parallel (scheduler runtime state)",
    "sglang.srt.utils.network": "NetworkAddress (only for tcp endpoint parsing)",
    "sglang.srt.mem_cache.utils": "compute_node_hash_values / compute_node_event_hash_values / "
    "hash_str_to_int64 copied from the wheel's mem_cache/utils.py, with get_native_hash (a "
    "JIT-compiled C++ extension) replaced by a Python SHA-256 chain; the module itself imports "
    "torch kernels",
}
REAL_SGLANG = ["sglang/srt/disaggregation/kv_events.py", "sglang/srt/mem_cache/events.py"]

log = logging.getLogger("record")


# --------------------------------------------------------------------------------------------
# parent: download, then one child per engine
# --------------------------------------------------------------------------------------------
def wheel_for(wheels: Path, pkg: str, version: str) -> Path:
    """The downloaded wheel of ``pkg==version``."""
    found = sorted(wheels.glob(f"{pkg}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"no {pkg}-{version} wheel in {wheels}: run with --download")
    return found[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, default=Path("/tmp/kvroute-wheels"),
                    help="directory holding (or receiving) the engine wheels")
    ap.add_argument("--download", action="store_true", help="pip download --no-deps first")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="golden payload directory")
    ap.add_argument("--engine", choices=sorted(ENGINES), action="append",
                    help="record only these engines (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.child:
        return child(args.child, args.wheels, args.out)
    args.wheels.mkdir(parents=True, exist_ok=True)
    for name in args.engine or sorted(ENGINES):
        pkg, version = ENGINES[name]
        if args.download:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            f"{pkg}=={version}", "-d", str(args.wheels)], check=True)
        wheel_for(args.wheels, pkg, version)
        subprocess.run([sys.executable, __file__, "--child", name, "--wheels",
                        str(args.wheels), "--out", str(args.out)], check=True)
    return 0


# --------------------------------------------------------------------------------------------
# child: load the engine's modules from its wheel
# --------------------------------------------------------------------------------------------
def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = []  # type: ignore[attr-defined]
        sys.modules[name] = mod
        parent, _, leaf = name.rpartition(".")
        if parent:
            setattr(_module(parent), leaf, mod)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _load(root: Path, rel: str) -> types.ModuleType:
    name = rel[:-3].replace("/", ".")
    parent, _, leaf = name.rpartition(".")
    _module(parent)
    spec = importlib.util.spec_from_file_location(name, root / rel)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    setattr(sys.modules[parent], leaf, mod)
    return mod


class _Placeholder:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass


def _stub_vllm() -> None:
    import dataclasses
    for pkg in ("vllm", "vllm.distributed", "vllm.v1", "vllm.v1.core", "vllm.utils",
                "vllm.multimodal"):
        _module(pkg)
    _module("vllm.config", VllmConfig=_Placeholder)
    _module("vllm.config.utils", config=dataclasses.dataclass)
    _module("vllm.logger", init_logger=logging.getLogger)

    def get_mm_features_in_window(features: Any, start: int, end: int) -> tuple[int, int]:
        for i, f in enumerate(features):
            if f.mm_position.offset + f.mm_position.length > start:
                return i, i
        return len(features), len(features)

    _module("vllm.multimodal.utils", get_mm_features_in_window=get_mm_features_in_window)
    _module("vllm.utils.network_utils", get_ip=lambda: "127.0.0.1",
            get_tcp_uri=lambda ip, port: f"tcp://{ip}:{port}",
            is_valid_ipv6_address=lambda ip: False,
            split_zmq_path=lambda p: tuple(p.rsplit(":", 2)))
    _module("vllm.utils.mem_utils", format_gib=lambda b: f"{b / 2**30:.2f}")
    _module("vllm.utils.torch_utils", get_dtype_size=lambda d: 2)
    names = ["AttentionSpec", "ChunkedLocalAttentionSpec", "CrossAttentionSpec",
             "FullAttentionSpec", "KVCacheConfig", "KVCacheGroupSpec", "KVCacheSpec",
             "KVCacheTensor", "MambaSpec", "SlidingWindowSpec", "UniformTypeKVCacheSpecs",
             "MLAAttentionSpec", "SinkFullAttentionSpec", "EncoderOnlyAttentionSpec"]
    _module("vllm.v1.kv_cache_interface",
            **{n: type(n, (_Placeholder,), {}) for n in names},
            __getattr__=lambda n: type(n, (_Placeholder,), {}))
    _module("vllm.v1.kv_cache_spec_registry", KVCacheSpecRegistry=_Placeholder)
    _module("vllm.v1.request", Request=_Placeholder)
    _module("vllm.v1.utils", tensor_data=bytes)
    _module("vllm.v1.core.kv_cache_metrics", KVCacheMetricsCollector=_Placeholder)
    _module("cbor2", dumps=lambda *a, **k: b"", loads=lambda *a, **k: None)


def _extract(wheel: Path, rels: list[str], dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for rel in rels:
            z.extract(rel, dest)


def sha256_file(p: Path) -> str:
    """sha256 of a file."""
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# capture through the engine's own publisher
# --------------------------------------------------------------------------------------------
class Capture:
    """A SUB + DEALER on an engine publisher's ipc:// sockets, recording frames as received."""

    def __init__(self, tmp: Path, name: str) -> None:
        import zmq
        self.pub_ep = f"ipc://{tmp}/{name}.pub"
        self.replay_ep = f"ipc://{tmp}/{name}.replay"
        self.ctx = zmq.Context()
        self.sub: Any = None
        self.live: list[list[bytes]] = []
        self.replays: list[dict[str, Any]] = []
        self.incarnation = 0
        self.live_incarnation: list[int] = []

    def connect(self) -> None:
        import zmq
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.pub_ep)
        time.sleep(0.3)  # slow joiner

    def drain(self, expect: int, timeout_s: float = 5.0) -> None:
        """Receive ``expect`` live messages."""
        got = 0
        deadline = time.time() + timeout_s
        while got < expect and time.time() < deadline:
            if self.sub.poll(100):
                self.live.append(self.sub.recv_multipart())
                self.live_incarnation.append(self.incarnation)
                got += 1
        if got < expect:
            raise RuntimeError(f"captured {got} of {expect} live messages")

    def replay(self, start: int) -> None:
        """Ask the engine's replay socket for batches from ``start``; record the replies."""
        import zmq
        d = self.ctx.socket(zmq.DEALER)
        d.connect(self.replay_ep)
        d.send_multipart([b"", start.to_bytes(8, "big")])
        replies = []
        while d.poll(3000):
            frames = d.recv_multipart()
            replies.append(frames)
            if frames[-2] == b"\xff" * 8:
                break
        d.close(linger=0)
        self.replays.append({"start": start, "incarnation": self.incarnation,
                             "after_live": len(self.live), "replies": replies})

    def close(self) -> None:
        """Close the sockets."""
        self.ctx.destroy(linger=0)


class Recorder:
    """Writes scenarios of one engine."""

    def __init__(self, engine: str, wheel: Path, out: Path, stubs: dict[str, str],
                 real: list[str]) -> None:
        self.engine = engine
        pkg, version = ENGINES[engine]
        self.prov = {"package": pkg, "version": version, "wheel": wheel.name,
                     "wheel_sha256": sha256_file(wheel), "stubs": stubs,
                     "real_modules_from_wheel": real,
                     "recorded_by": "scripts/record_engine_payloads.py"}
        self.out = out / engine
        self.out.mkdir(parents=True, exist_ok=True)

    def write(self, scenario: str, description: str, cap: Capture, config: dict[str, Any],
              probes: list[dict[str, Any]]) -> None:
        """Write the payload file and its provenance."""
        import msgspec
        blob = {"live": cap.live, "live_incarnation": cap.live_incarnation,
                "replays": cap.replays}
        (self.out / f"{scenario}.msgpack").write_bytes(msgspec.msgpack.encode(blob))
        prov = {**self.prov, "scenario": scenario, "description": description,
                "engine_config": config, "probes": probes,
                "recorded_unix": int(time.time())}
        (self.out / f"{scenario}.json").write_text(json.dumps(prov, indent=1) + "\n")
        log.info("%s/%s: %d live, %d replay requests", self.engine, scenario, len(cap.live),
                 len(cap.replays))


def child(engine: str, wheels: Path, out: Path) -> int:
    """Record every scenario of one engine (runs in its own process: module names clash)."""
    pkg, version = ENGINES[engine]
    wheel = wheel_for(wheels, pkg, version)
    with tempfile.TemporaryDirectory(prefix="kvroute-rec-") as td:
        tmp = Path(td)
        if engine in REAL_LEGACY:
            import record_legacy  # type: ignore[import-not-found]
            _extract(wheel, REAL_LEGACY[engine], tmp / "src")
            if pkg == "vllm":
                rec = Recorder(engine, wheel, out, record_legacy.STUBS_VLLM_090,
                               REAL_LEGACY[engine])
                record_legacy.record_vllm_090(rec, tmp)
            else:
                rec = Recorder(engine, wheel, out, record_legacy.STUBS_SGLANG_0410,
                               REAL_LEGACY[engine])
                record_legacy.record_sglang_0410(rec, tmp)
        elif pkg == "vllm":
            from record_vllm import record_vllm  # type: ignore[import-not-found]
            _extract(wheel, REAL_VLLM, tmp / "src")
            _stub_vllm()
            mods = {rel: _load(tmp / "src", rel) for rel in REAL_VLLM}
            rec = Recorder(engine, wheel, out, STUBS_VLLM, REAL_VLLM)
            record_vllm(rec, mods, tmp, version)
        else:
            from record_sglang import record_sglang  # type: ignore[import-not-found]
            _extract(wheel, [*REAL_SGLANG, "sglang/srt/mem_cache/utils.py"], tmp / "src")
            rec = Recorder(engine, wheel, out, STUBS_SGLANG, REAL_SGLANG)
            record_sglang(rec, tmp, version)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent / "recording"))
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
