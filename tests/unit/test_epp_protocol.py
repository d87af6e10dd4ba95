"""The endpoint picker's pure parts: protocol messages, endpoints, usage scanning, settings."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from kvroute.errors import ConfigError
from router_service.epp import protocol
from router_service.epp.endpoints import endpoint_of, is_ip_endpoint, join
from router_service.epp.settings import EppSettings
from router_service.epp.usage import UsageScanner


def test_header_map_prefers_raw_value_and_joins_repeats() -> None:
    hm = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions"),
        base_pb2.HeaderValue(key="X-Session-Id", value="s1"),
        base_pb2.HeaderValue(key="accept", raw_value=b"a"),
        base_pb2.HeaderValue(key="accept", raw_value=b"b")])
    assert protocol.header_map(hm) == {":path": "/v1/completions", "x-session-id": "s1",
                                       "accept": "a,b"}


def test_destination_header_is_set_with_raw_value_and_metadata_matches() -> None:
    mutation = protocol.set_headers({protocol.DESTINATION_HEADER: "10.0.0.1:8000,10.0.0.2:8000"})
    (opt,) = mutation.set_headers
    assert opt.header.raw_value == b"10.0.0.1:8000,10.0.0.2:8000" and not opt.header.value
    md = protocol.destination_metadata("envoy.lb", "10.0.0.1:8000,10.0.0.2:8000")
    assert md["envoy.lb"][protocol.DESTINATION_HEADER] == opt.header.raw_value.decode()
    resp = protocol.continue_headers(request=True, mutation=mutation)
    assert resp.request_headers.response.clear_route_cache
    assert not protocol.continue_headers(request=False, mutation=mutation) \
        .response_headers.response.clear_route_cache


def test_subset_hint_from_filter_metadata_list_or_string() -> None:
    req = ep.ProcessingRequest()
    hint = req.metadata_context.filter_metadata["envoy.lb.subset_hint"]
    hint.update({protocol.SUBSET_KEY: ["10.0.0.1:8000", " 10.0.0.2:8000 "]})
    value = protocol.filter_value(req, "envoy.lb.subset_hint", protocol.SUBSET_KEY)
    assert protocol.endpoint_list(value) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert protocol.endpoint_list("10.0.0.1:8000, ,10.0.0.3:8000") == ["10.0.0.1:8000",
                                                                      "10.0.0.3:8000"]
    assert protocol.filter_value(req, "envoy.lb", protocol.SERVED_KEY) is None
    assert protocol.endpoint_list(struct_pb2.Value()) == []


def test_immediate_response_is_an_openai_error() -> None:
    resp = protocol.immediate(503, "no healthy node", "no node")
    ir = resp.immediate_response
    assert ir.status.code == 503
    assert json.loads(ir.body)["message"] == "no healthy node"
    assert ir.details == "no_node"
    assert not protocol.immediate(429, "shed", "shed", with_body=False).immediate_response.body


def test_streamed_pieces_split_large_bodies_and_mark_only_the_last() -> None:
    data = bytes(range(256)) * 1000  # 256 kB
    pieces = protocol.streamed_pieces(True, data, True)
    bodies = [p.request_body.response.body_mutation.streamed_response for p in pieces]
    assert b"".join(b.body for b in bodies) == data
    assert all(len(b.body) <= protocol.BODY_CHUNK for b in bodies)
    assert [b.end_of_stream for b in bodies] == [False] * (len(bodies) - 1) + [True]
    (empty,) = protocol.streamed_pieces(False, b"", True)
    assert empty.response_body.response.body_mutation.streamed_response.end_of_stream


@pytest.mark.parametrize(("address", "endpoint"), [
    ("http://10.0.0.7:8000", "10.0.0.7:8000"),
    ("http://10.0.0.7:8000/v1", "10.0.0.7:8000"),
    ("10.0.0.7:8000", "10.0.0.7:8000"),
    ("https://10.0.0.7", "10.0.0.7:443"),
    ("http://[fd00::1]:8000", "[fd00::1]:8000"),
    ("http://engine-0.svc:8000", "engine-0.svc:8000"),
])
def test_endpoint_of_node_addresses(address: str, endpoint: str) -> None:
    assert endpoint_of(address) == endpoint


def test_ip_endpoints_and_join() -> None:
    assert is_ip_endpoint("10.0.0.7:8000") and is_ip_endpoint("[fd00::1]:8000")
    assert not is_ip_endpoint("engine-0.svc:8000")
    assert join(["a:1", "b:2", "a:1", ""]) == "a:1,b:2"


def test_usage_scanner_finds_cached_tokens_split_across_pieces() -> None:
    body = json.dumps({"choices": [{"text": 'say "cached_tokens": 999'}],
                       "usage": {"prompt_tokens": 4096,
                                 "prompt_tokens_details": {"cached_tokens": 1234}}}).encode()
    for cut in range(1, len(body)):
        s = UsageScanner(1 << 20)
        s.feed(body[:cut])
        s.feed(body[cut:])
        assert s.cached_tokens == 1234, cut
        assert s.prompt_tokens == 4096, cut


def test_usage_scanner_reads_the_last_sse_usage_and_stops_at_its_limit() -> None:
    events = [b'data: {"choices": [{"text": " a"}], "usage": null}\n\n',
              b'data: {"choices": [], "usage": {"prompt_tokens": 80, '
              b'"prompt_tokens_details": {"cached_tokens": 64}}}\n\n', b"data: [DONE]\n\n"]
    s = UsageScanner(1 << 20)
    for e in events:
        s.feed(e)
    assert s.cached_tokens == 64
    capped = UsageScanner(10)
    for e in events:
        capped.feed(e)
    assert capped.exhausted and capped.cached_tokens is None


def test_settings_validate_their_fields() -> None:
    ok = EppSettings(registry="127.0.0.1:1")
    assert ok.fallback_endpoints == 0 and ok.destination_namespace == "envoy.lb"
    with pytest.raises(ConfigError, match="fallback-endpoints"):
        EppSettings(registry="127.0.0.1:1", fallback_endpoints=17)
    with pytest.raises(ConfigError, match="max-body-bytes"):
        EppSettings(registry="127.0.0.1:1", max_body_bytes=10)
    with pytest.raises(ConfigError, match="registry"):
        EppSettings()
