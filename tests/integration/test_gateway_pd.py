"""The gateway orchestrating disaggregated requests, with the official ``openai`` client, against
real processes: etcd, registry, 2 prefill + 2 decode engine_sim engines with their node agents
(``--role``), and two gateways in front of the same fleet, one per hand-over protocol
(``--pd-protocol vllm``: prefill with ``kv_transfer_params``, then decode; ``sglang``:
``bootstrap_host/port/room`` to both at once).

Checks: streaming and non-streaming text and chat completions go prefill -> decode, the
transfer is visible in the engines' own records (the prefill computed one token, the decode
received the blocks it lacked); a second turn reuses the prefill node's cache; both halves are
released (no request stays in flight); with one prefill and one decode engine killed, no
request fails while a healthy pair exists (one retry, failed node marked suspect).
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")

from kvroute.procs import free_port  # noqa: E402
from tests.harness import ServerGroup, ServerProcess, metric, scrape  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "sim-model"
BS = 16
ROLES = ("prefill", "prefill", "decode", "decode")


class PdStack:
    """Registry, 4 engines + agents with roles, a vLLM-protocol and an SGLang-protocol gateway."""

    def __init__(self, etcd: str, prefix: str, work: Path) -> None:
        self.procs = ServerGroup(work)
        self.engines: dict[str, ServerProcess] = {}
        self.agents: dict[str, ServerProcess] = {}
        self.work = work
        with self.procs.stopped_on_error():  # a failed start leaks none of the others
            self._start_all(etcd, prefix)

    def _start_all(self, etcd: str, prefix: str) -> None:
        self.registry = self.procs.start("registry", [
            # The fault test freezes two agents, and their nodes must stay known and healthy
            # until a gateway tried them: a long lease (60 s), and the registry's suggested
            # heartbeat interval (20 s; the agents beat every 0.3 s by their own flag) puts
            # "late" (unhealthy) at 2 x 20 + 0.5 s. With 0.3 s it was 1.1 s after the freeze, and
            # on a loaded machine the first requests came later: no dead node left to retry.
            "--etcd-endpoints", etcd, "--etcd-prefix", prefix, "--lease-ttl-s", "60",
            "--heartbeat-interval-s", "20", "--status-write-interval-s", "0.5"], "registry")
        for i, role in enumerate(ROLES):
            node = f"{role}-{i}"
            # the engine binds its own ports (events and replay on port 0 by default) and
            # reports them: no port picked here that another process could take first
            eng = self.procs.start("engine-sim", [
                "--model", MODEL, "--block-size", str(BS), "--capacity-blocks", "2000",
                "--time-scale", "0.02", "--role", role, "--transfer-ms-per-block", "1"],
                f"sim-{node}")
            self.engines[node] = eng
            self.agents[node] = self.procs.start("agent", [
                "--registry", self.registry.grpc_target, "--node-id", node, "--model", MODEL,
                "--engine-url", f"http://127.0.0.1:{eng.ready['http_port']}", "--role", role,
                "--capacity-blocks", "2000", "--engine-events", eng.ready["events_endpoint"],
                "--engine-replay", eng.ready["replay_endpoint"], "--heartbeat-interval-s", "0.3",
                "--rpc-timeout-s", "2"], f"agent-{node}")
        self.urls = {}
        for proto, extra in (("vllm", []), ("sglang", ["--pd-bootstrap-port", "0"])):
            gw = self.procs.start("gateway", [
                "--registry", self.registry.grpc_target, "--block-size", str(BS),
                "--registry-retry-max-s", "0.3", "--pd-protocol", proto, *extra],
                f"gateway-{proto}")
            self.urls[proto] = f"http://127.0.0.1:{gw.ready['http_port']}"

    def stop(self) -> None:
        self.procs.stop()

    def wait_healthy(self, nodes: int, within_s: float = 30.0) -> None:
        deadline = time.monotonic() + within_s
        for url in self.urls.values():
            while get_json(f"{url}/health", ok_only=False).get("healthy_nodes") != nodes:
                assert time.monotonic() < deadline, f"{url}: not {nodes} healthy nodes"
                time.sleep(0.1)

    def client(self, proto: str) -> Any:
        return openai.OpenAI(base_url=f"{self.urls[proto]}/v1", api_key="unused",
                             max_retries=0, timeout=30)

    def records(self, request_id: str) -> dict[str, dict[str, Any]]:
        """The engines' records of ``request_id``, by node (engine-side truth)."""
        out = {}
        for node, eng in self.engines.items():
            if eng.process.proc is None or eng.process.proc.poll() is not None:
                continue
            stats = get_json(f"http://127.0.0.1:{eng.ready['http_port']}/kvroute/stats")
            for rec in stats["records"]:
                if rec["request_id"] == request_id:
                    out[node] = rec
        return out


def get_json(url: str, ok_only: bool = True) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as f:
            return json.loads(f.read())
    except urllib.error.HTTPError as exc:
        if ok_only:
            raise
        return json.loads(exc.read() or b"{}")
    except OSError:
        if ok_only:
            raise
        return {}


def inflight(url: str) -> float:
    return metric(scrape(f"{url}/metrics"), "kvroute_router_inflight_requests")


@pytest.fixture(scope="module")
def stack(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdStack]:
    st = PdStack(etcd_endpoint, f"/kvroute-test/gwpd-{free_port()}/",
                 tmp_path_factory.mktemp("gateway-pd"))
    try:
        st.wait_healthy(4)
        yield st
    finally:
        st.stop()


def _pair(stack: PdStack, rid: str, completion: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request's prefill and decode records; asserts the transfer happened."""
    deadline = time.monotonic() + 20
    while len(recs := stack.records(rid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the SGLang prefill record lands when its answer was drained
    (pnode, p), (dnode, d) = sorted(recs.items(), key=lambda kv: not kv[0].startswith("pre"))
    assert pnode.startswith("prefill") and dnode.startswith("decode"), recs
    assert (p["completion_tokens"], p["remote_kv"]) == (1, False)
    assert (d["completion_tokens"], d["remote_kv"]) == (completion, True)
    assert d["transfer_blocks"] >= 1
    return p, d


@pytest.mark.parametrize("proto", ["vllm", "sglang"])
def test_text_completions_prefill_then_decode(stack: PdStack, proto: str) -> None:
    client = stack.client(proto)
    prompt = list(range(100 + len(proto), 100 + len(proto) + 16 * 6 + 3))  # 6 blocks + 3
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=4, extra_headers={"x-request-id": f"t-{proto}"})
    out = raw.parse()
    assert out.usage.completion_tokens == 4 and out.choices[0].text
    prefill_node, decode_node = raw.headers["x-kvroute-node"], raw.headers["x-kvroute-decode-node"]
    assert prefill_node.startswith("prefill") and decode_node.startswith("decode")
    p, d = _pair(stack, f"t-{proto}", 4)
    assert d["transfer_blocks"] == 7 and p["cached_tokens"] == 0
    # streamed, second turn: the prefill node reuses its cache, the decode node holds the first
    # turn's blocks and receives only the new ones
    chunks = list(client.completions.create(
        model=MODEL, prompt=[*prompt, *range(1, 40)], max_tokens=3, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-request-id": f"t2-{proto}"}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 3
    p2, d2 = _pair(stack, f"t2-{proto}", 3)
    assert p2["cached_tokens"] == 16 * 6
    if d2["cached_tokens"]:  # the same decode node: it holds the first turn's 6 blocks
        assert d2["transfer_blocks"] == 3
    deadline = time.monotonic() + 20
    while inflight(stack.urls[proto]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inflight(stack.urls[proto]) == 0  # both halves released


@pytest.mark.parametrize("proto", ["vllm", "sglang"])
def test_chat_streaming_and_not(stack: PdStack, proto: str) -> None:
    client = stack.client(proto)
    msgs = [{"role": "user", "content": f"Explain disaggregated serving ({proto}). " * 6}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5,
                                          extra_headers={"x-request-id": f"c-{proto}"})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    _pair(stack, f"c-{proto}", 5)
    parts = list(client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4, stream=True,
        extra_headers={"x-request-id": f"cs-{proto}"}))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    _pair(stack, f"cs-{proto}", 4)


def test_prefill_error_reaches_the_client(stack: PdStack) -> None:
    """A 4xx from the prefill node is the client's answer (no retry, nothing left in flight)."""
    for proto in ("vllm", "sglang"):
        with pytest.raises(openai.BadRequestError):
            stack.client(proto).completions.create(model=MODEL, prompt=[1, 2, 3],
                                                   max_tokens=10**7)


def test_no_request_fails_while_a_healthy_pair_exists(stack: PdStack) -> None:
    """Kill one prefill and one decode engine: every request still succeeds (retry on a new
    pair, failed nodes marked suspect). Runs last: it leaves the fleet at one pair.

    The two nodes' agents are frozen first, so the registry keeps both dead nodes, healthy
    (their leases run 60 s and a node is late only after 40 s without heartbeats), and the
    gateways must find out by trying them: otherwise an agent that sees its engine die reports
    it within 0.3 s, and on a loaded machine that can come before any request reaches the dead
    node (no retry to observe)."""
    for node in ("prefill-0", "decode-2"):
        stack.agents[node].process.signal(signal.SIGSTOP)
        stack.engines[node].process.kill()
    for proto in ("vllm", "sglang"):
        client = stack.client(proto)
        for i in range(6):
            prompt = list(range(5000 + 200 * i, 5000 + 200 * i + 40))
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                            stream=bool(i % 2),
                                            extra_headers={"x-request-id": f"k-{proto}-{i}",
                                                           # prefill nodes in turn: the dead
                                                           # one is tried while still known
                                                           "x-kvroute-policy": "round_robin"})
            if i % 2:
                assert list(out)
            else:
                assert out.usage.completion_tokens == 2
            _pair(stack, f"k-{proto}-{i}", 2)
    retried = sum(metric(scrape(f"{url}/metrics"), "kvroute_gateway_retries_total")
                  for url in stack.urls.values())
    assert retried >= 1  # a dead (still listed) node was tried and the retry served
