"""Peer routers (PEERS.md) in front of two engine_sim processes: each routes a request through.

Needs the ``[peers]`` extra (sglang-router, vllm-router); skipped with the reason when a package
is missing. Every process is started here and stopped by its pid. Requests carry a ``user`` id
that both routers forward unchanged, so the engines' own records prove where a request landed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvroute.procs import ManagedProcess, free_port, wait_until
from tests.harness import ServerProcess, start_server

pytestmark = [pytest.mark.peers, pytest.mark.integration]

MODEL = "sim-model"
BIN = Path(sys.executable).parent


def _vllm_router() -> str | None:
    local = BIN / "vllm-router"
    return str(local) if local.exists() else shutil.which("vllm-router")


def _http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw


def _healthy(url: str) -> bool:
    try:
        _http("GET", url, timeout=1.0)
        return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Two engine_sim processes (compressed time, same cache and latency model)."""
    work = tmp_path_factory.mktemp("peers")
    started: list[ServerProcess] = []
    try:
        for i in range(2):
            started.append(start_server(
                "engine-sim", ["--time-scale", "0.01", "--capacity-blocks", "512",
                               "--model", MODEL], work, name=f"engine{i}"))
        yield started
    finally:
        for srv in started:
            srv.stop()


def _url(srv: ServerProcess) -> str:
    return f"http://127.0.0.1:{srv.ready['http_port']}"


def _landed(engines: list[ServerProcess], user: str) -> list[dict[str, Any]]:
    """The engine records of request ``user`` (from the engines, never the router)."""
    out = []
    for srv in engines:
        stats = _http("GET", _url(srv) + "/kvroute/stats")
        out += [dict(r, engine=_url(srv)) for r in stats["records"] if r["request_id"] == user]
    return out


def _start_router(name: str, argv: list[str], port: int, tmp_path: Path,
                  env: dict[str, str] | None = None) -> ManagedProcess:
    proc = ManagedProcess(name, argv, tmp_path / f"{name}.log", env=env).start()
    try:
        wait_until(lambda: _healthy(f"http://127.0.0.1:{port}/health"), 30.0,
                   f"{name} /health", interval_s=0.2, proc=proc.proc)
    except BaseException as exc:
        proc.stop()
        raise RuntimeError(f"{exc}\n--- {name} log ---\n{proc.tail()}") from exc
    return proc


def test_sglang_router_routes_to_engine_sim(engines: list[ServerProcess], tmp_path: Path) -> None:
    if importlib.util.find_spec("sglang_router") is None:
        pytest.skip("sglang-router not installed (pip install 'kvroute[peers]')")
    port, prom = free_port(), free_port()
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")  # never reach the model hub
    router = _start_router("sglang-router", [
        sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
        "--port", str(port), "--worker-urls", *[_url(e) for e in engines],
        "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(prom), "--log-level", "warn"], port, tmp_path, env)
    try:
        base = f"http://127.0.0.1:{port}"
        # text prompt on the OpenAI route; token ids on SGLang's /generate
        out = _http("POST", base + "/v1/completions", {
            "model": MODEL, "prompt": "hello engine sim " * 20, "max_tokens": 3,
            "user": "sg-text"})
        assert out["usage"]["completion_tokens"] == 3
        out = _http("POST", base + "/generate", {
            "model": MODEL, "input_ids": list(range(1, 50)),
            "sampling_params": {"max_new_tokens": 2}, "rid": "sg-ids"})
        assert out["meta_info"]["completion_tokens"] == 2
        assert len(_landed(engines, "sg-text")) == 1
        assert len(_landed(engines, "sg-ids")) == 1
    finally:
        assert router.stop() is not None


def test_vllm_router_cache_aware_and_kv_aware(engines: list[ServerProcess],
                                              tmp_path: Path) -> None:
    exe = _vllm_router()
    if exe is None:
        pytest.skip("vllm-router not installed (pip install 'kvroute[peers]')")
    workers = [_url(e) for e in engines]

    # cache_aware: tokenizes text prompts through the engines' /v1/completions/render
    port = free_port()
    router = _start_router("vllm-router-cache", [
        exe, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
        "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(free_port())], port, tmp_path)
    try:
        out = _http("POST", f"http://127.0.0.1:{port}/v1/completions", {
            "model": MODEL, "prompt": "a shared system prompt " * 10, "max_tokens": 2,
            "user": "vr-cache"})
        assert out["usage"]["prompt_tokens"] > 0
        assert len(_landed(engines, "vr-cache")) == 1
    finally:
        router.stop()

    # kv_aware: subscribes to both engines' map-encoded KV events (and replay sockets)
    port, prom = free_port(), free_port()
    argv = [exe, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
            "--policy", "kv_aware", "--kv-event-block-size", "16", "--kv-event-model", MODEL,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom)]
    for e in engines:
        argv += ["--kv-event-source", f"{_url(e)}={e.ready['events_endpoint']}",
                 "--kv-event-replay-source", f"{_url(e)}={e.ready['replay_endpoint']}"]
    router = _start_router("vllm-router-kv", argv, port, tmp_path)
    try:
        prompt = list(range(5000, 5000 + 16 * 6 + 3))
        base = f"http://127.0.0.1:{port}/v1/completions"
        _http("POST", base, {"model": MODEL, "prompt": prompt, "max_tokens": 2,
                             "user": "vr-kv-1"})
        assert len(_landed(engines, "vr-kv-1")) == 1

        def indexed() -> bool:  # the router learned the blocks from our events
            text = _http("GET", f"http://127.0.0.1:{prom}/metrics").decode()
            return 'vllm_router_kv_placement_lookups_total{result="hit"}' in text

        deadline = time.monotonic() + 10
        n = 1
        while True:  # events are asynchronous: repeat until a lookup hits
            n += 1
            _http("POST", base, {"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                 "user": f"vr-kv-{n}"})
            if indexed() or time.monotonic() > deadline:
                break
        assert indexed(), "vllm-router kv_aware never matched engine_sim's KV events"
        # the request the router matched went to an engine holding the prompt's 6 blocks
        [again] = _landed(engines, f"vr-kv-{n}")
        assert again["cached_tokens"] == 16 * 6
    finally:
        router.stop()


def test_sglang_router_pd_mode_through_engine_sim(engines: list[ServerProcess],
                                                  tmp_path: Path) -> None:
    """sglang-router --pd-disaggregation in front of engine_sim: it injects bootstrap_host/
    port/room and sends the request to the prefill and the decode engine; the engines' records
    show the prefill (one token, computed) and the decode (KV received, not prefilled)."""
    if importlib.util.find_spec("sglang_router") is None:
        pytest.skip("sglang-router not installed (pip install 'kvroute[peers]')")
    pre, dec = engines
    port, prom = free_port(), free_port()
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")  # never reach the model hub
    router = _start_router("sglang-router-pd", [
        sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
        "--port", str(port), "--pd-disaggregation",
        # engine_sim's bootstrap server is its HTTP port
        "--prefill", _url(pre), str(pre.ready["http_port"]), "--decode", _url(dec),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom),
        "--log-level", "warn"], port, tmp_path, env)
    try:
        base = f"http://127.0.0.1:{port}"
        prompt = list(range(3000, 3000 + 16 * 4 + 5))
        out = _http("POST", base + "/generate", {
            "model": MODEL, "input_ids": prompt, "sampling_params": {"max_new_tokens": 5},
            "rid": "sg-pd-1"}, timeout=30)
        assert out["meta_info"]["completion_tokens"] == 5  # the decode engine's answer
        recs = {r["engine"]: r for r in _landed(engines, "sg-pd-1")}
        p, d = recs[_url(pre)], recs[_url(dec)]
        assert (p["completion_tokens"], p["remote_kv"], p["cached_tokens"]) == (1, False, 0)
        assert (d["completion_tokens"], d["remote_kv"], d["transfer_blocks"]) == (5, True, 5)
        assert d["cached_tokens"] == 0
        # a follow-up turn: the prefill reuses its cache, the decode holds the first 4 blocks
        out = _http("POST", base + "/generate", {
            "model": MODEL, "input_ids": [*prompt, *range(1, 20)],
            "sampling_params": {"max_new_tokens": 2}, "rid": "sg-pd-2"}, timeout=30)
        assert out["meta_info"]["cached_tokens"] == 64
        recs = {r["engine"]: r for r in _landed(engines, "sg-pd-2")}
        assert recs[_url(pre)]["cached_tokens"] == 64
        assert (recs[_url(dec)]["cached_tokens"], recs[_url(dec)]["transfer_blocks"]) == (64, 2)
        # text on the OpenAI route, streamed from the decode engine
        req = urllib.request.Request(base + "/v1/completions", method="POST", data=json.dumps({
            "model": MODEL, "prompt": "disaggregated hello " * 12, "max_tokens": 3,
            "stream": True, "user": "sg-pd-3"}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            events = [ln for ln in resp.read().split(b"\n") if ln.startswith(b"data: {")]
        assert len(events) == 3
        recs = {r["engine"]: r for r in _landed(engines, "sg-pd-3")}
        assert recs[_url(dec)]["remote_kv"] and recs[_url(pre)]["completion_tokens"] == 1
        assert _http("GET", _url(pre) + "/kvroute/stats?records=0")["bootstrap_rooms_done"] >= 3
    finally:
        assert router.stop() is not None
