"""The endpoint picker protocol at the message level: a real gRPC client plays the data plane
against ``kvroute serve epp`` (real registry on real etcd, engine_sim + agents), for what the
shipped Envoy config does not exercise: the ordered fallback list, the subset hint as the
protocol's list value, metadata equal to the header, and the served endpoint read back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from bench.epp_stack import EppStack
from bench.stack_fleet import FleetSpec
from router_service.epp import protocol
from tests.harness import metric, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = FleetSpec(nodes=3, block_size=16, time_scale=0.01, heartbeat_interval_s=0.05,
                 start_router=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EppStack]:
    st = EppStack(tmp_path_factory.mktemp("epp-grpc"), SPEC,
                  picker_args=("--fallback-endpoints", "2"))
    st.start()
    try:
        yield st
    finally:
        st.close()


def _headers(path: str, extra: dict[str, str] | None = None) -> base_pb2.HeaderMap:
    values = {":method": "POST", ":path": path, "content-type": "application/json",
              **(extra or {})}
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                       for k, v in values.items()])


def _request(body: bytes, subset: Sequence[str] | None = None) -> list[ep.ProcessingRequest]:
    first = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=_headers("/v1/completions")),
        protocol_config=ep.ProtocolConfiguration(request_body_mode=protocol.BUFFERED,
                                                 response_body_mode=protocol.STREAMED))
    if subset is not None:
        hint = first.metadata_context.filter_metadata["envoy.lb.subset_hint"]
        hint.update({protocol.SUBSET_KEY: list(subset)})
    return [first, ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))]


async def _exchange(target: str, msgs: list[ep.ProcessingRequest],
                    respond: list[ep.ProcessingRequest] | None = None,
                    ) -> list[ep.ProcessingResponse]:
    """Send the request messages (and, after the picker's answer, the response messages)."""
    out: list[ep.ProcessingResponse] = []
    async with grpc.aio.insecure_channel(target) as ch:
        call = ep_grpc.ExternalProcessorStub(ch).Process()
        for m in msgs:
            await call.write(m)
        out.append(await call.read())  # headers CONTINUE
        out.append(await call.read())  # the body answer with the destination (or immediate)
        for m in respond or []:
            await call.write(m)
            out.append(await call.read())
        await call.done_writing()
        async for extra in _rest(call):
            out.append(extra)
    return out


async def _rest(call: grpc.aio.StreamStreamCall) -> AsyncIterator[ep.ProcessingResponse]:  # type: ignore[type-arg]
    while True:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            return
        yield msg


def _destination(resp: ep.ProcessingResponse) -> tuple[str, str]:
    """(header value, envoy.lb metadata value) of a body answer."""
    (opt,) = [o for o in resp.request_body.response.header_mutation.set_headers
              if o.header.key == protocol.DESTINATION_HEADER]
    md = resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    return opt.header.raw_value.decode(), md[protocol.DESTINATION_HEADER].string_value


def _body(seed: int, n: int = 128) -> bytes:
    return json.dumps({"prompt": [1000 + (seed * 31 + i) % 30_000 for i in range(n)],
                       "max_tokens": 1}).encode()


async def test_fallback_list_in_header_and_metadata(stack: EppStack) -> None:
    target = f"127.0.0.1:{stack.picker_port}"
    endpoints = set(stack.engine_endpoints.values())
    out = await _exchange(target, _request(_body(1)))
    assert out[0].HasField("request_headers")
    header, metadata = _destination(out[1])
    assert header == metadata  # the protocol: never two different values
    listed = header.split(",")
    assert len(listed) == 3 and set(listed) == endpoints  # primary + 2 fallbacks, in order
    assert out[1].request_body.response.clear_route_cache


async def test_subset_hint_as_a_list_and_served_endpoint(stack: EppStack) -> None:
    target = f"127.0.0.1:{stack.picker_port}"
    ends = sorted(stack.engine_endpoints.values())
    served_before = _metric(stack, "kvroute_epp_served_elsewhere_total")
    resp_headers = ep.ProcessingRequest(response_headers=ep.HttpHeaders(
        headers=_headers("/", {":status": "200"})))
    md = resp_headers.metadata_context.filter_metadata["envoy.lb"]
    md.update({protocol.SERVED_KEY: ends[1]})  # the data plane served from a fallback
    usage = json.dumps({"usage": {"prompt_tokens": 128,
                                  "prompt_tokens_details": {"cached_tokens": 96}}}).encode()
    resp_body = ep.ProcessingRequest(response_body=ep.HttpBody(body=usage, end_of_stream=True))
    out = await _exchange(target, _request(_body(2), subset=ends[:2]),
                          respond=[resp_headers, resp_body])
    header, _ = _destination(out[1])
    assert set(header.split(",")) == set(ends[:2])  # only the subset, fallbacks included
    echoed = {o.header.key: o.header.raw_value.decode()
              for o in out[2].response_headers.response.header_mutation.set_headers}
    assert echoed[protocol.SERVED_ECHO_HEADER] == ends[1]
    assert out[3].HasField("response_body")
    if header.split(",")[0] != ends[1]:
        assert _metric(stack, "kvroute_epp_served_elsewhere_total") == served_before + 1
    assert _metric(stack, "kvroute_epp_reported_cached_tokens_total") >= 96
    # a subset naming nothing kvroute knows: 503 immediate response
    out = await _exchange(target, _request(_body(3), subset=["10.255.0.1:9"]))
    assert out[1].immediate_response.status.code == 503


async def test_streamed_request_body_mode_is_refused_with_the_fix(stack: EppStack) -> None:
    target = f"127.0.0.1:{stack.picker_port}"
    first = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=_headers("/v1/completions")),
        protocol_config=ep.ProtocolConfiguration(request_body_mode=protocol.STREAMED))
    async with grpc.aio.insecure_channel(target) as ch:
        call = ep_grpc.ExternalProcessorStub(ch).Process()
        await call.write(first)
        resp = await call.read()
        await call.done_writing()
    assert resp.immediate_response.status.code == 500
    assert b"FULL_DUPLEX_STREAMED" in resp.immediate_response.body


def _metric(stack: EppStack, name: str) -> float:
    return metric(scrape(stack.picker_metrics_url), name)


def test_struct_helpers_accept_protocol_shapes() -> None:
    v = struct_pb2.Value()
    v.list_value.values.add().string_value = "10.0.0.1:8000"
    assert protocol.endpoint_list(protocol._plain(v)) == ["10.0.0.1:8000"]
