"""The gateway with the official ``openai`` client, against real processes: etcd, registry, two
engine_sim engines with their node agents, and ``kvroute serve gateway``.

Checks: streaming and non-streaming chat and text completions; a conversation's second turn
(whole history resent) lands on the first turn's node and the engine reports cached tokens;
a client that disconnects mid-stream releases the in-flight slot (and the engine aborts); bad
input gets the OpenAI error shape with the right status; an engine killed mid-run costs at most
the requests in flight on it, and no client hangs.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

openai = pytest.importorskip("openai")

from kvroute.blocks import hash_blocks  # noqa: E402
from kvroute.procs import free_port  # noqa: E402
from kvroute.v1 import registry_pb2, registry_pb2_grpc  # noqa: E402
from tests.harness import ServerGroup, ServerProcess, metric, scrape, start_server  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "sim-model"
BS = 16
SYSTEM = ("You are a careful assistant for a fleet of inference engines. " * 12).strip()


class Stack:
    """Registry, engines + agents, gateway; ``stop`` ends exactly these processes."""

    def __init__(self, etcd: str, prefix: str, work: Path, engines: int = 2,
                 gateway_args: tuple[str, ...] = ()) -> None:
        self.procs = ServerGroup(work)
        self.engines: dict[str, ServerProcess] = {}
        with self.procs.stopped_on_error():  # a failed start leaks none of the others
            self._start_all(etcd, prefix, engines, gateway_args)

    def _start_all(self, etcd: str, prefix: str, engines: int,
                   gateway_args: tuple[str, ...]) -> None:
        # Every server binds its own ports (port 0) and reports them in its ready file: no port
        # picked here that another process could take before the server binds it.
        # Agents beat every 0.3 s (their own flag); the registry's suggested interval (5 s) sets
        # when it calls a node late: 10.5 s, and the leases run 30 s. Nothing here tests expiry
        # or lateness (a dead engine is reported by its agent), and a node flagged late for a
        # moment on a loaded machine (a 0.8-s stall with a 0.3-s interval) moved a second turn
        # to the other node.
        self.registry = self.procs.start("registry", [
            "--etcd-endpoints", etcd, "--etcd-prefix", prefix, "--lease-ttl-s", "30",
            "--heartbeat-interval-s", "5", "--status-write-interval-s", "0.5"], "registry")
        for i in range(engines):
            eng = self.engines[f"node-{i}"] = self.procs.start("engine-sim", [
                "--model", MODEL, "--block-size", str(BS), "--capacity-blocks", "2000",
                "--time-scale", "0.02",
                # 10 ms a token (500 model ms x 0.02): the engine-kill test's long streams run
                # 10 s, so none ends before the kill however slowly they start
                "--decode-ms-per-token", "500"], f"sim{i}")
            self.procs.start("agent", [
                "--registry", self.registry.grpc_target, "--node-id", f"node-{i}",
                "--model", MODEL, "--engine-url", f"http://127.0.0.1:{eng.ready['http_port']}",
                "--capacity-blocks", "2000",
                "--engine-events", eng.ready["events_endpoint"],
                "--engine-replay", eng.ready["replay_endpoint"],
                "--heartbeat-interval-s", "0.3", "--rpc-timeout-s", "2"], f"agent{i}")
        self.gateway = self.procs.start("gateway", [
            "--registry", self.registry.grpc_target, "--block-size", str(BS),
            "--registry-retry-max-s", "0.3", "--models-refresh-s", "1",
            "--max-body-bytes", "65536", *gateway_args], "gateway")
        self.url = f"http://127.0.0.1:{self.gateway.ready['http_port']}"

    def stop(self) -> None:
        self.procs.stop()

    def wait_healthy(self, nodes: int, within_s: float = 20.0) -> None:
        deadline = time.monotonic() + within_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = get_json(f"{self.url}/health")
                if last.get("healthy_nodes") == nodes:
                    return
            except urllib.error.HTTPError as exc:
                last = exc.read()
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"gateway not healthy with {nodes} nodes: {last}")

    def client(self, **kw: Any) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             timeout=30, **kw)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as f:
        return json.loads(f.read())


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as f:
            return f.status, json.loads(f.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def stack(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(etcd_endpoint, f"/kvroute-test/gw-{free_port()}/",
               tmp_path_factory.mktemp("gateway"))
    try:
        st.wait_healthy(2)
        yield st
    finally:
        st.stop()


def test_models_health_metrics(stack: Stack) -> None:
    models = stack.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert get_json(f"{stack.url}/health")["healthy_nodes"] == 2
    text = scrape(f"{stack.url}/metrics")
    assert "kvroute_gateway_requests_total" in text and "kvroute_router_" in text


def test_chat_and_text_completions_streaming_and_not(stack: Stack) -> None:
    c = stack.client()
    chat = c.chat.completions.create(model=MODEL, max_tokens=5, messages=[
        {"role": "user", "content": "Say hello to the fleet."}])
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].message.content.split()) == 5
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens == 5

    chunks = list(c.chat.completions.create(
        model=MODEL, max_tokens=6, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Stream a few words."}]))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(text.split()) == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    done = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert len(done.choices[0].text.split()) == 4 and done.usage.prompt_tokens > 0
    ids = c.completions.create(model=MODEL, prompt=list(range(1000, 1100)), max_tokens=3)
    assert ids.usage.prompt_tokens == 100
    streamed = list(c.completions.create(model=MODEL, prompt="A streamed story", max_tokens=7,
                                         stream=True))
    assert len("".join(s.choices[0].text for s in streamed).split()) == 7


def _blocks_indexed(stack: Stack, tokens: list[int]) -> dict[str, int]:
    with grpc.insecure_channel(stack.registry.grpc_target) as ch:
        resp = registry_pb2_grpc.RegistryStub(ch).Lookup(registry_pb2.LookupRequest(
            block_hashes=hash_blocks(tokens, BS), model=MODEL), timeout=5)
    return {n.node_id: n.matched_blocks for n in resp.nodes}


def test_second_turn_lands_on_first_node_with_cached_tokens(stack: Stack) -> None:
    c = stack.client()
    history: list[dict[str, str]] = [
        {"role": "system", "content": f"{SYSTEM} Conversation {time.time_ns()}."},
        {"role": "user", "content": "Tell me about prefix caching in detail."}]
    raw = c.chat.completions.with_raw_response.create(model=MODEL, max_tokens=20,
                                                      messages=history)
    first = raw.parse()
    node = raw.headers["x-kvroute-node"]
    assert raw.headers["x-kvroute-predicted-cached-tokens"] == "0"
    # wait until the agent has reported turn 1's blocks to the registry
    _, tok = post(f"{stack.url.rsplit(':', 1)[0]}:"
                  f"{stack.engines[node].ready['http_port']}/tokenize",
                  json.dumps({"model": MODEL, "messages": history}).encode())
    deadline = time.monotonic() + 30
    while _blocks_indexed(stack, tok["tokens"]).get(node, 0) < len(tok["tokens"]) // BS:
        assert time.monotonic() < deadline, "turn 1 blocks never indexed"
        time.sleep(0.1)
    time.sleep(0.3)  # the gateway's replica follows the registry's changes
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And how does routing use it?"}]
    raw2 = c.chat.completions.with_raw_response.create(model=MODEL, max_tokens=5,
                                                       messages=history)
    second = raw2.parse()
    assert raw2.headers["x-kvroute-node"] == node
    assert int(raw2.headers["x-kvroute-predicted-cached-tokens"]) > 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    assert cached >= int(raw2.headers["x-kvroute-predicted-cached-tokens"]) - BS


def test_client_disconnect_mid_stream_releases_the_slot(stack: Stack) -> None:
    c = stack.client()
    stream = c.completions.create(model=MODEL, prompt=f"long story {time.time_ns()}",
                                  max_tokens=20000, stream=True)
    next(iter(stream))
    stream.close()  # client goes away mid-stream

    def inflight() -> tuple[float, float]:
        text = scrape(f"{stack.url}/metrics")
        return (metric(text, "kvroute_gateway_inflight_requests"),
                metric(text, "kvroute_router_inflight_requests"))

    def running() -> list[int]:
        return [get_json(f"http://127.0.0.1:{e.ready['http_port']}/get_load")["num_running"]
                for e in stack.engines.values()]

    # the gateway releases the slot when its write to the client fails, then drops the
    # upstream request; the engine aborts at its next write, a moment later: wait for both
    deadline = time.monotonic() + 20
    while inflight() != (0.0, 0.0):
        assert time.monotonic() < deadline, f"slot not released: {inflight()}"
        time.sleep(0.05)
    while any(running()):
        assert time.monotonic() < deadline, f"the engine did not abort: {running()}"
        time.sleep(0.05)


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": MODEL}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [{"content": "x"}]}).encode(), 400,
     "messages[0].role"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
                ).encode(), 404, "model"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}
                ).encode(), 413, None),
])
def test_bad_input_gets_openai_errors(stack: Stack, body: bytes, status: int,
                                      param: str | None) -> None:
    got, obj = post(f"{stack.url}/v1/chat/completions", body)
    assert got == status, obj
    assert set(obj["error"]) >= {"message", "type", "param", "code"}
    assert obj["error"]["param"] == param


def test_expect_100_continue_and_unknown_fields_pass(stack: Stack) -> None:
    """curl sends Expect: 100-continue for bodies over 1 KiB: the gateway answers it and does
    not forward it (the engine would answer 100 first). Unknown fields reach the engine."""
    import http.client

    port = int(stack.url.rsplit(":", 1)[1])
    body = json.dumps({"model": MODEL, "prompt": list(range(2000, 2400)), "max_tokens": 2,
                       "some_future_field": {"x": 1}, "user": "expect-test"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/completions", body=body, headers={
        "Content-Type": "application/json", "Expect": "100-continue"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert json.loads(resp.read())["usage"]["prompt_tokens"] == 400
    conn.close()


def test_unknown_model_with_openai_client(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError):
        stack.client().completions.create(model="nope", prompt="x", max_tokens=1)


def test_concurrency_limit_answers_429_with_retry_after(stack: Stack, tmp_path: Path) -> None:
    gw = start_server("gateway", [
        "--registry", stack.registry.grpc_target, "--block-size", str(BS),
        "--max-concurrent-requests", "1", "--retry-after-s", "2"], tmp_path, name="gw-limit")
    try:
        url = f"http://127.0.0.1:{gw.ready['http_port']}"
        deadline = time.monotonic() + 15
        while post(f"{url}/v1/completions", b'{"prompt": [1, 2, 3], "max_tokens": 1}')[0] != 200:
            assert time.monotonic() < deadline, "second gateway never routed"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        stream = c.completions.create(model=MODEL, prompt="hold the slot", max_tokens=20000,
                                      stream=True)
        next(iter(stream))
        req = urllib.request.Request(f"{url}/v1/completions", data=b'{"prompt": "x"}',
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 429 and info.value.headers["Retry-After"] == "2"
        assert json.loads(info.value.read())["error"]["type"] == "rate_limit_error"
        stream.close()
    finally:
        assert gw.stop() == 0


def test_no_healthy_node_is_503(stack: Stack, etcd_endpoint: str, tmp_path: Path) -> None:
    with ServerGroup(tmp_path) as procs:
        empty = procs.start("registry", [
            "--etcd-endpoints", etcd_endpoint,
            "--etcd-prefix", f"/kvroute-test/empty-{free_port()}/"], "reg-empty")
        gw = procs.start("gateway", ["--registry", empty.grpc_target], "gw-empty")
        url = f"http://127.0.0.1:{gw.ready['http_port']}"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{url}/health", timeout=5)
        assert info.value.code == 503
        status, obj = post(f"{url}/v1/completions", b'{"prompt": [1, 2, 3]}')
        assert status == 503 and obj["error"]["message"]
        assert urllib.request.urlopen(f"{url}/live", timeout=5).status == 200


def test_engine_killed_mid_run_costs_at_most_its_inflight(stack: Stack) -> None:
    """Runs last in the module: it kills one engine of the shared stack. Long streams are in
    flight on both engines when node-1 dies: those on node-1 may fail, those on node-0 finish,
    and every request sent afterwards succeeds on node-0 (connect error -> retry before the
    first byte). Nothing hangs."""
    ac = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0,
                            timeout=30)
    victim = stack.engines["node-1"]

    async def one(k: int, max_tokens: int, started: list[str]) -> tuple[str, str]:
        node = "?"
        try:
            raw = await ac.completions.with_raw_response.create(
                model=MODEL, prompt=f"request {k} {time.time_ns()} " * 20,
                max_tokens=max_tokens, stream=True)
            node = raw.headers["x-kvroute-node"]
            started.append(node)
            async for _ in raw.parse():
                pass
            return "ok", node
        except Exception as exc:  # a broken stream surfaces as an httpx/openai error
            return f"error:{type(exc).__name__}", node

    async def inflight() -> int:
        text = await asyncio.to_thread(scrape, f"{stack.url}/metrics")
        return int(metric(text, "kvroute_gateway_inflight_requests"))

    async def run() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        started: list[str] = []
        long = [asyncio.create_task(one(k, 1000, started)) for k in range(8)]
        deadline = time.monotonic() + 20
        while len(started) < 8 or "node-1" not in started:
            assert time.monotonic() < deadline, f"long streams did not start: {started}"
            await asyncio.sleep(0.05)
        assert await inflight() == 8
        victim.process.kill()
        after = [await one(100 + k, 5, []) for k in range(12)]
        return list(await asyncio.wait_for(asyncio.gather(*long), 60)), after

    t0 = time.monotonic()
    during, after = asyncio.run(run())
    assert time.monotonic() - t0 < 60
    on_victim = [r for r in during if r[1] == "node-1"]
    assert [r for r in during if r[1] == "node-0"] == \
        [("ok", "node-0")] * (len(during) - len(on_victim))
    assert on_victim and all(r[0].startswith("error") for r in on_victim), on_victim
    assert after == [("ok", "node-0")] * len(after)
