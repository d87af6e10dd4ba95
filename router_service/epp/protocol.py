"""Names and message builders of the Gateway API Inference Extension endpoint picker protocol.

The protocol (proposal 004-endpoint-picker-protocol, v1.0.0) on top of Envoy's
``envoy.service.ext_proc.v3.ExternalProcessor``:

- the picked endpoint(s) go in the ``x-gateway-destination-endpoint`` request header
  (``ip:port`` or an ordered ``ip:port,ip:port,...``) and, with the same value, in dynamic
  metadata ``envoy.lb`` / ``x-gateway-destination-endpoint``;
- the data plane may restrict the choice with filter metadata ``envoy.lb.subset_hint`` /
  ``x-gateway-destination-endpoint-subset`` (a list of ``ip:port``);
- on the response path it reports ``envoy.lb`` / ``x-gateway-destination-endpoint-served``;
- no eligible endpoint -> ImmediateResponse 503; shed load -> ImmediateResponse 429.

Header values are set with ``raw_value``: Envoy ignores ``value`` in ext_proc header mutations
(measured: the header arrives empty).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

NODE_HEADER = "x-kvroute-node"
ENDPOINT_HEADER = "x-kvroute-endpoint"
EXPECTED_CACHED_HEADER = "x-kvroute-expected-cached-tokens"
SERVED_ECHO_HEADER = "x-kvroute-served"

BODY_CHUNK = 64 * 1024
"""Largest body piece the picker sends back in one streamed_response (full-duplex mode)."""

ProcessingMode = int
NONE = 0
STREAMED = 1
BUFFERED = 2
BUFFERED_PARTIAL = 3
FULL_DUPLEX_STREAMED = 4


def header_map(headers: base_pb2.HeaderMap) -> dict[str, str]:
    """Lower-cased header name -> value; ``raw_value`` (bytes) wins over ``value``."""
    out: dict[str, str] = {}
    for h in headers.headers:
        val = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{val}" if key in out else val
    return out


def set_headers(values: Mapping[str, str]) -> ep.HeaderMutation:
    """A mutation setting each header (overwriting), values as ``raw_value``."""
    return ep.HeaderMutation(set_headers=[
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
        for k, v in values.items()])


def destination_metadata(namespace: str, endpoints: str) -> struct_pb2.Struct:
    """Dynamic metadata ``{namespace: {x-gateway-destination-endpoint: endpoints}}``."""
    md = struct_pb2.Struct()
    md.get_or_create_struct(namespace)[DESTINATION_HEADER] = endpoints
    return md


def filter_value(req: ep.ProcessingRequest, namespace: str, key: str) -> object:
    """The plain-Python value of ``metadata_context.filter_metadata[namespace][key]`` or None."""
    fm = req.metadata_context.filter_metadata
    if namespace not in fm:
        return None
    fields = fm[namespace].fields
    if key not in fields:
        return None
    return _plain(fields[key])


def _plain(v: struct_pb2.Value) -> object:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "list_value":
        return [_plain(x) for x in v.list_value.values]
    if kind == "number_value":
        return v.number_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return {k: _plain(x) for k, x in v.struct_value.fields.items()}
    return None


def endpoint_list(value: object) -> list[str]:
    """``ip:port`` entries of a subset hint / served value: a list, or a comma-separated string."""
    items: Iterable[object]
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list):
        items = value
    else:
        return []
    return [s.strip() for s in (str(i) for i in items) if s.strip()]


def immediate(status: int, message: str, details: str, with_body: bool = True,
              ) -> ep.ProcessingResponse:
    """An ImmediateResponse with an OpenAI-style JSON error body."""
    kind = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestTooLargeError",
            429: "RateLimitError", 503: "ServiceUnavailableError"}.get(status, "InternalError")
    body = json.dumps({"object": "error", "message": message, "type": kind, "param": None,
                       "code": status}).encode() if with_body else b""
    headers = {"content-type": "application/json"} if with_body else {}
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=set_headers(headers), body=body,
        details=details.replace(" ", "_")[:128]))


def _common(request: bool, mutation: ep.HeaderMutation | None) -> ep.CommonResponse:
    if mutation is None:
        return ep.CommonResponse()
    return ep.CommonResponse(header_mutation=mutation, clear_route_cache=request)


def continue_headers(request: bool, mutation: ep.HeaderMutation | None = None,
                     ) -> ep.ProcessingResponse:
    """CONTINUE for a headers message, optionally with a header mutation.

    A request-path mutation also clears Envoy's route cache, so a route that matches on
    ``x-gateway-destination-endpoint`` is chosen again (Envoy keeps the first match otherwise).
    """
    common = _common(request, mutation)
    hr = ep.HeadersResponse(response=common)
    return (ep.ProcessingResponse(request_headers=hr) if request
            else ep.ProcessingResponse(response_headers=hr))


def continue_body(request: bool, mutation: ep.HeaderMutation | None = None,
                  ) -> ep.ProcessingResponse:
    """CONTINUE for a body message (buffered/streamed modes: the body passes unchanged)."""
    common = _common(request, mutation)
    br = ep.BodyResponse(response=common)
    return (ep.ProcessingResponse(request_body=br) if request
            else ep.ProcessingResponse(response_body=br))


def streamed_body(request: bool, data: bytes, end_of_stream: bool) -> ep.ProcessingResponse:
    """Full-duplex mode: hand a body piece back to Envoy (the filter forwards what we send)."""
    br = ep.BodyResponse(response=ep.CommonResponse(body_mutation=ep.BodyMutation(
        streamed_response=ep.StreamedBodyResponse(body=data, end_of_stream=end_of_stream))))
    return (ep.ProcessingResponse(request_body=br) if request
            else ep.ProcessingResponse(response_body=br))


def streamed_pieces(request: bool, data: bytes, end_of_stream: bool,
                    ) -> list[ep.ProcessingResponse]:
    """``data`` handed back in pieces of at most :data:`BODY_CHUNK` bytes."""
    if not data:
        return [streamed_body(request, b"", end_of_stream)]
    out = []
    for i in range(0, len(data), BODY_CHUNK):
        piece = data[i:i + BODY_CHUNK]
        out.append(streamed_body(request, piece, end_of_stream and i + BODY_CHUNK >= len(data)))
    return out


def continue_trailers(request: bool) -> ep.ProcessingResponse:
    """Trailers pass unchanged."""
    tr = ep.TrailersResponse()
    return (ep.ProcessingResponse(request_trailers=tr) if request
            else ep.ProcessingResponse(response_trailers=tr))
