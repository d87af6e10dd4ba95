"""engine_sim as a real process: HTTP completions with measured cached tokens, KV events on a
SUB socket, replay, vLLM metric names, seq back at 0 after a restart, clean SIGTERM exit."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from tests.harness import ServerProcess, metric, scrape, start_server

pytestmark = pytest.mark.integration


def post(srv: ServerProcess, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.ready['http_port']}{path}",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw


def get(srv: ServerProcess, path: str) -> bytes:
    url = f"http://127.0.0.1:{srv.ready['http_port']}{path}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: bytes = resp.read()
    return data


def replay(endpoint: str, start: int) -> list[list[bytes]]:
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out: list[list[bytes]] = []
        while not out or out[-1][2] != b"\xff" * 8:
            out.append(dealer.recv_multipart())
        return out
    finally:
        dealer.close()
        ctx.term()


ARGS = ["--time-scale", "0.01", "--block-size", "16", "--capacity-blocks", "64",
        "--topic", "kv@test"]


def test_completions_cache_events_metrics_restart(tmp_path: Path) -> None:
    srv = start_server("engine-sim", ARGS, tmp_path, name="sim")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@test")
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.setsockopt(zmq.LINGER, 0)
    try:
        sub.connect(srv.ready["events_endpoint"])
        prompt = list(range(1000, 1040))  # 2 full blocks + 8 tokens
        first = post(srv, "/v1/completions", {"model": "sim-model", "prompt": prompt,
                                               "max_tokens": 4, "user": "req-1"})
        assert first["usage"]["prompt_tokens"] == 40
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        second = post(srv, "/v1/completions", {"model": "sim-model", "prompt": prompt,
                                                "max_tokens": 4, "user": "req-2"})
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 32

        # events arrive on SUB (the subscription may join late: keep sending new prompts)
        got: list[bytes] | None = None
        deadline = time.monotonic() + 10
        n = 0
        while got is None and time.monotonic() < deadline:
            n += 1
            post(srv, "/v1/completions", {"prompt": list(range(n * 100, n * 100 + 16)),
                                          "max_tokens": 1})
            try:
                got = sub.recv_multipart()
            except zmq.Again:
                continue
        assert got is not None and got[0] == b"kv@test" and len(got[1]) == 8
        _ts, events, rank = msgspec.msgpack.decode(got[2])
        assert rank == 0 and events[0]["type"] == "BlockStored"
        assert events[0]["block_size"] == 16
        assert len(events[0]["token_ids"]) == 16 * len(events[0]["block_hashes"])

        # the engine's own truth
        stats = json.loads(get(srv, "/kvroute/stats"))
        recs = {r["request_id"]: r for r in stats["records"]}
        assert recs["req-1"]["cached_tokens"] == 0 and recs["req-2"]["cached_tokens"] == 32
        assert stats["cached_tokens"] == 32
        metrics = get(srv, "/metrics").decode()
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                     "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                     "vllm:prefix_cache_hits_total"):
            assert f'{name}{{engine="0",model_name="sim-model"}}' in metrics
        assert 'vllm:prefix_cache_hits_total{engine="0",model_name="sim-model"} 32.0' in metrics
        assert "kvroute_engine_sim_evicted_blocks_total" in scrape(srv.metrics_url)

        # replay from 0 returns the first batch: the first prompt's two blocks
        replies = replay(srv.ready["replay_endpoint"], 0)
        assert replies[0][2] == (0).to_bytes(8, "big")
        ev0 = msgspec.msgpack.decode(replies[0][3])[1][0]
        assert ev0["token_ids"] == prompt[:32] and ev0["parent_block_hash"] is None
        first_hashes = ev0["block_hashes"]
        assert srv.stop() == 0  # SIGTERM: clean exit

        # a restarted engine starts its sequence at 0 again, with new (random-seeded) hashes
        srv = start_server("engine-sim", ARGS, tmp_path, name="sim2")
        post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        replies = replay(srv.ready["replay_endpoint"], 0)
        assert replies[0][2] == (0).to_bytes(8, "big")
        ev0 = msgspec.msgpack.decode(replies[0][3])[1][0]
        assert ev0["token_ids"] == prompt[:32] and ev0["block_hashes"] != first_hashes
    finally:
        sub.close()
        ctx.term()
        srv.stop()


def test_errors_streaming_and_sglang_generate(tmp_path: Path) -> None:
    srv = start_server("engine-sim", ["--capacity-blocks", "4", "--time-scale", "0.01"],
                       tmp_path)
    try:
        for body, status, words in [
            ({"prompt": [1, -2]}, 400, "token ids"),
            ({"prompt": list(range(100)), "max_tokens": 1}, 400, "KV blocks"),
            ({"model": "other", "prompt": "hi"}, 404, "does not exist"),
            ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
            ({}, 400, "prompt is required"),
            ({"prompt": "hi", "stream": True, "stream_options": 5}, 400, "stream_options"),
        ]:
            with pytest.raises(urllib.error.HTTPError) as err:
                post(srv, "/v1/completions", body)
            assert err.value.code == status
            assert words in json.loads(err.value.read())["message"]
        ok = post(srv, "/generate", {"input_ids": [1, 2, 3], "sampling_params":
                                     {"max_new_tokens": 2}})
        assert ok["meta_info"]["completion_tokens"] == 2
        assert "model_path" not in json.loads(get(srv, "/model_info"))
        # streaming: one SSE chunk per token, the usage chunk, then [DONE]
        raw = post(srv, "/v1/completions", {"prompt": [5] * 20, "max_tokens": 3, "stream": True,
                                            "stream_options": {"include_usage": True}})
        chunks = [c.removeprefix(b"data: ") for c in raw.split(b"\n\n") if c]
        assert chunks[-1] == b"[DONE]"
        body = [json.loads(c) for c in chunks[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in body[:3]] == [None, None, "length"]
        assert body[3]["usage"]["completion_tokens"] == 3 and body[3]["choices"] == []
        assert json.loads(get(srv, "/get_load"))["num_running"] == 0
    finally:
        assert srv.stop() == 0


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    srv = start_server("engine-sim", ["--decode-ms-per-token", "200"], tmp_path)
    result: dict[str, Any] = {}

    def call() -> None:
        result["body"] = post(srv, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 10})

    t = threading.Thread(target=call)
    try:
        t.start()
        # SIGTERM once the engine runs the request (it decodes for 1.8 s): a fixed 0.3-s sleep
        # could signal a loaded machine's engine before the request reached it
        deadline = time.monotonic() + 20
        while json.loads(get(srv, "/get_load"))["num_running"] != 1:
            assert time.monotonic() < deadline and "body" not in result, "never running"
            time.sleep(0.02)
        assert srv.stop() == 0
        t.join(10)
        assert result["body"]["usage"]["completion_tokens"] == 10
    finally:
        srv.stop()


def test_one_process_serves_independent_engines(tmp_path: Path) -> None:
    """--engines 3: three engines, each with its own HTTP, ZMQ and metrics ports and cache."""
    srv = start_server("engine-sim", [*ARGS, "--engines", "3"], tmp_path, name="fleet")
    try:
        engines = srv.ready["engines"]
        assert len(engines) == 3
        for key in ("http_port", "metrics_port", "events_port", "replay_port"):
            assert len({e[key] for e in engines}) == 3, key
        assert srv.ready["http_port"] == engines[0]["http_port"]
        prompt = list(range(5000, 5040))
        cached = []
        for e in engines:
            one = ServerProcess("engine-sim", srv.process, e)
            body = {"prompt": prompt, "max_tokens": 2}
            post(one, "/v1/completions", body)
            cached.append(post(one, "/v1/completions", body)["usage"]["prompt_tokens_details"]
                          ["cached_tokens"])
            assert "vllm:prefix_cache_hits_total" in scrape(
                f"http://127.0.0.1:{e['metrics_port']}/metrics")
            # each engine replays its own event stream from seq 0
            assert replay(e["replay_endpoint"], 0)[0][2] == (0).to_bytes(8, "big")
        assert cached == [32, 32, 32]  # separate caches: each engine missed once, then hit
        stats = [json.loads(get(ServerProcess("engine-sim", srv.process, e), "/kvroute/stats"))
                 for e in engines]
        assert [s["requests_admitted"] for s in stats] == [2, 2, 2]
        assert srv.stop() == 0
    finally:
        srv.stop()


def test_vllm_kv_transfer_params_prefill_then_decode(tmp_path: Path) -> None:
    """vLLM's P/D protocol: the prefill answer's kv_transfer_params make the decode engine
    receive the KV (stored in its cache and published as BlockStored) instead of prefilling."""
    srv = start_server("engine-sim", [*ARGS, "--engines", "2", "--transfer-ms-per-block", "5"],
                       tmp_path, name="pd")
    try:
        pre, dec = (ServerProcess("engine-sim", srv.process, e) for e in srv.ready["engines"])
        prompt = list(range(7000, 7040))  # 2 full blocks + 8 tokens
        ask = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
               "remote_block_ids": None, "remote_host": None, "remote_port": None}
        p = post(pre, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "stream": False,
                                          "kv_transfer_params": ask, "user": "pd-1"})
        kvt = p["kv_transfer_params"]
        assert kvt["do_remote_prefill"] is True and kvt["remote_port"] == pre.ready["http_port"]
        assert len(kvt["remote_block_ids"]) == 3 and kvt["remote_engine_id"]
        d = post(dec, "/v1/completions", {"prompt": prompt, "max_tokens": 3,
                                          "kv_transfer_params": kvt, "user": "pd-1"})
        assert d["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # all received
        # the received blocks are in the decode engine's cache and event stream
        ev = msgspec.msgpack.decode(replay(dec.ready["replay_endpoint"], 0)[0][3])[1][0]
        assert ev["type"] == "BlockStored" and ev["token_ids"] == prompt[:32]
        again = post(dec, "/v1/completions", {"prompt": [*prompt, 1, 2], "max_tokens": 1,
                                              "kv_transfer_params": kvt})
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
        stats = json.loads(get(pre, "/kvroute/stats"))
        assert stats["requests_admitted"] == 1 and not stats["records"][0]["remote_kv"]
        dec_recs = json.loads(get(dec, "/kvroute/stats"))["records"]
        assert [(r["remote_kv"], r["transfer_blocks"]) for r in dec_recs] == [(True, 3), (True, 1)]
        # receipts are not prefill, as on vLLM's decode instance: a prefill rate an agent
        # derives from the prefill histograms is the prefill engine's alone
        def scraped(e: ServerProcess, name: str) -> float:
            return metric(scrape(e.metrics_url), name)
        assert scraped(pre, "vllm:request_prefill_kv_computed_tokens_sum") == 40
        assert scraped(pre, "vllm:request_prefill_time_seconds_sum") > 0
        assert scraped(dec, "vllm:request_prefill_kv_computed_tokens_sum") == 0
        assert scraped(dec, "vllm:request_prefill_time_seconds_sum") == 0
        assert scraped(dec, "kvroute_engine_sim_kv_received_blocks_total") == 4
        with pytest.raises(urllib.error.HTTPError) as err:
            post(dec, "/v1/completions", {"prompt": prompt, "kv_transfer_params": {
                "do_remote_decode": True, "do_remote_prefill": True}})
        assert err.value.code == 400
        info = json.loads(get(dec, "/server_info"))
        assert info["disaggregation_mode"] == "null"
        assert srv.stop() == 0
    finally:
        srv.stop()


def test_sglang_bootstrap_prefill_and_decode(tmp_path: Path) -> None:
    """SGLang's P/D protocol: the same body (bootstrap_host/port/room) goes to both engines at
    once; the decode waits on the prefill engine's bootstrap server, then receives the KV."""
    srv = start_server("engine-sim", [*ARGS, "--engines", "2", "--transfer-ms-per-block", "5",
                                      "--bootstrap-timeout-s", "2"], tmp_path, name="sgl")
    try:
        pre, dec = (ServerProcess("engine-sim", srv.process, e) for e in srv.ready["engines"])
        prompt = list(range(9000, 9040))  # 2 full blocks + 8 tokens
        boot = {"bootstrap_host": "127.0.0.1", "bootstrap_port": pre.ready["http_port"],
                "bootstrap_room": 2**63 - 5}
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 4}, "rid": "sg-1",
                **boot}
        answers: dict[str, Any] = {}

        def send(name: str, target: ServerProcess) -> None:
            answers[name] = post(target, "/generate", body)

        # the decode request first: it must wait for the prefill, not fail
        threads = [threading.Thread(target=send, args=("dec", dec))]
        threads[0].start()
        time.sleep(0.2)
        threads.append(threading.Thread(target=send, args=("pre", pre)))
        threads[1].start()
        for t in threads:
            t.join(10)
        assert answers["pre"]["meta_info"]["completion_tokens"] == 1  # prefill stops there
        assert answers["dec"]["meta_info"]["completion_tokens"] == 4
        [p] = json.loads(get(pre, "/kvroute/stats"))["records"]
        dstats = json.loads(get(dec, "/kvroute/stats"))
        [d] = dstats["records"]
        assert (p["request_id"], p["remote_kv"], p["completion_tokens"]) == ("sg-1", False, 1)
        assert (d["request_id"], d["remote_kv"], d["transfer_blocks"]) == ("sg-1", True, 3)
        assert d["kv_wait_s"] > 0 and dstats["cached_tokens"] == 0
        assert json.loads(get(pre, "/kvroute/stats"))["bootstrap_rooms_done"] == 1
        # received blocks are published as BlockStored by the decode engine
        ev = msgspec.msgpack.decode(replay(dec.ready["replay_endpoint"], 0)[0][3])[1][0]
        assert ev["type"] == "BlockStored" and ev["token_ids"] == prompt[:32]
        # OpenAI route, second turn: the decode engine already holds the first 2 blocks
        room2 = dict(boot, bootstrap_room=7)
        longer = {"model": "sim-model", "prompt": [*prompt, *range(1, 30)], "max_tokens": 2,
                  "user": "sg-2", **room2}
        t = threading.Thread(target=lambda: answers.update(pre2=post(pre, "/v1/completions",
                                                                     longer)))
        t.start()
        out = post(dec, "/v1/completions", longer)
        t.join(10)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
        # a failed prefill fails its room: the decode answers 503 at once, naming it
        bad = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 10**9},
               "bootstrap_host": "127.0.0.1", "bootstrap_port": pre.ready["http_port"],
               "bootstrap_room": 11}
        with pytest.raises(urllib.error.HTTPError) as err:
            post(pre, "/generate", bad)
        assert err.value.code == 400
        with pytest.raises(urllib.error.HTTPError) as err:
            post(dec, "/generate", dict(bad, sampling_params={"max_new_tokens": 2}))
        assert err.value.code == 503 and b"room 11" in err.value.read()
        # no prefill ever: 503 after --bootstrap-timeout-s; a null port: 503; malformed: 400
        t0 = time.monotonic()
        for room, port, code in ((12, pre.ready["http_port"], 503), (13, None, 503),
                                 (-1, pre.ready["http_port"], 400)):
            with pytest.raises(urllib.error.HTTPError) as err:
                post(dec, "/generate", dict(body, bootstrap_room=room, bootstrap_port=port))
            assert err.value.code == code
        assert 1.5 < time.monotonic() - t0 < 10
        with pytest.raises(urllib.error.HTTPError) as err:
            post(dec, "/v1/completions", {"prompt": prompt, **boot,
                                          "kv_transfer_params": {"do_remote_prefill": True}})
        assert err.value.code == 400
        assert srv.stop() == 0
    finally:
        srv.stop()
