"""gRPC plumbing on a real in-process server: error mapping, health, reflection, metrics, logs."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from kvroute.errors import InvalidArgument
from kvroute.grpcutil import add_health_and_reflection, bind, open_channel, unary_errors
from kvroute.settings import TLSSettings
from kvroute.telemetry import REQUEST_ID, JsonFormatter, MetricsServer
from kvroute.v1 import router_pb2, router_pb2_grpc
from tests.harness import scrape


class _Servicer(router_pb2_grpc.RouterServicer):
    @unary_errors
    async def Route(self, request: router_pb2.RouteRequest,
                    context: grpc.aio.ServicerContext[router_pb2.RouteRequest,
                                                      router_pb2.RouteResponse],
                    ) -> router_pb2.RouteResponse:
        if request.request_id == "bad":
            raise InvalidArgument("request_id: 'bad' is not allowed")
        if request.request_id == "boom":
            raise RuntimeError("unexpected")
        return router_pb2.RouteResponse(request_id=request.request_id, node_id="n1")


async def test_errors_health_reflection() -> None:
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(_Servicer(), server)
    name = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
    health = add_health_and_reflection(server, [name])
    port = bind(server, "127.0.0.1:0", TLSSettings())
    await server.start()
    await health.set_serving(True)
    try:
        async with open_channel(f"127.0.0.1:{port}") as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            ok = await stub.Route(router_pb2.RouteRequest(request_id="r1"), timeout=5)
            assert ok.node_id == "n1"
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.Route(router_pb2.RouteRequest(request_id="bad"), timeout=5)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "request_id" in (bad.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as boom:
                await stub.Route(router_pb2.RouteRequest(request_id="boom"), timeout=5)
            assert boom.value.code() == grpc.StatusCode.INTERNAL
            # the server survives and keeps answering
            assert (await stub.Route(router_pb2.RouteRequest(request_id="r2"))).node_id == "n1"

            hstub = health_pb2_grpc.HealthStub(ch)
            resp = await hstub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

            rstub = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = rstub.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await call.read()
            await call.done_writing()
            names = {s.name for s in reply.list_services_response.service}
            assert name in names and "grpc.health.v1.Health" in names
    finally:
        await server.stop(None)


def test_metrics_server_serves_its_own_registry() -> None:
    reg = CollectorRegistry()
    c = Counter("kvroute_test_events", "test events", registry=reg)
    c.inc(3)
    srv = MetricsServer(reg, "127.0.0.1", 0)
    port = srv.start()
    try:
        assert "kvroute_test_events_total 3.0" in scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        srv.stop()


def test_json_logs_carry_request_id() -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("kvroute.test.json")
    log.addHandler(handler)
    log.propagate = False
    token = REQUEST_ID.set("req-42")
    try:
        from kvroute.telemetry import RequestIdFilter
        handler.addFilter(RequestIdFilter())
        log.warning("hello %s", "world", extra={"node_id": "n1"})
    finally:
        REQUEST_ID.reset(token)
    line = json.loads(buf.getvalue())
    assert line["msg"] == "hello world" and line["request_id"] == "req-42"
    assert line["node_id"] == "n1" and line["level"] == "warning"
