"""Client keepalive vs server ping policy on real servers: an idle channel with our client
options must not be cut off with GOAWAY ``too_many_pings`` by a server built with
``server_options()`` (gRPC core's server defaults do cut it off: the control case)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvroute.grpcutil import (
    GRPC_OPTIONS_KEEPALIVE,
    GRPC_SERVER_OPTIONS_KEEPALIVE,
    add_health_and_reflection,
    bind,
    merge_options,
    open_channel,
    server_options,
)
from kvroute.settings import TLSSettings

CLIENT_PING_MS = 1000  # the test's client pings every second ...
SERVER_MIN_MS = 500  # ... and our server accepts pings at most every 0.5 s
IDLE_S = 4.5  # default server policy: 2 strikes allowed, the 3rd ping (~3 s) is GOAWAY


async def _start(options: list[tuple[str, Any]] | None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=options)
    health = add_health_and_reflection(server, [])
    port = bind(server, "127.0.0.1:0", TLSSettings())
    await server.start()
    await health.set_serving(True)
    return server, port


async def _watch(channel: grpc.aio.Channel, seen: list[grpc.ChannelConnectivity]) -> None:
    state = channel.get_state()
    while True:
        await channel.wait_for_state_change(state)
        state = channel.get_state()
        seen.append(state)


async def _idle_then_call(port: int) -> tuple[list[grpc.ChannelConnectivity], bool]:
    """Connect, stay idle for IDLE_S with 1 s client pings, then call again; returns the
    connectivity states seen after the first call and whether the second call succeeded."""
    fast = (("grpc.keepalive_time_ms", CLIENT_PING_MS), ("grpc.keepalive_timeout_ms", 2000))
    async with open_channel(f"127.0.0.1:{port}", options=fast) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        seen: list[grpc.ChannelConnectivity] = []
        watcher = asyncio.create_task(_watch(channel, seen))
        await asyncio.sleep(IDLE_S)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            ok = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        watcher.cancel()
        await asyncio.wait({watcher})
        return seen, ok


async def test_idle_client_channel_survives_keepalive_pings_on_our_servers() -> None:
    ours, ours_port = await _start(server_options(
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_MS)))
    stock, stock_port = await _start(None)  # gRPC core's server defaults
    try:
        (ours_seen, ours_ok), (stock_seen, _) = await asyncio.gather(
            _idle_then_call(ours_port), _idle_then_call(stock_port))
    finally:
        await asyncio.gather(ours.stop(None), stock.stop(None))
    # control: the default server sent GOAWAY too_many_pings, the channel left READY (a call
    # afterwards reconnects and succeeds, so only the state shows the cut)
    assert stock_seen, "a server with gRPC's default ping policy should have cut the channel"
    # ours: the connection stayed up through every ping, and the call after the pause worked
    assert ours_seen == [], f"channel to our server changed state while idle: {ours_seen}"
    assert ours_ok


def test_server_accepts_the_client_ping_interval() -> None:
    client = dict(GRPC_OPTIONS_KEEPALIVE)
    server = dict(GRPC_SERVER_OPTIONS_KEEPALIVE)
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client[
        "grpc.keepalive_time_ms"] // 2  # room for timer jitter
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1


def test_merge_options_lets_later_entries_replace_earlier_ones() -> None:
    merged = merge_options((("a", 1), ("b", 2)), (("b", 3), ("c", 4)))
    assert merged == [("a", 1), ("b", 3), ("c", 4)]
    assert dict(server_options(("grpc.so_reuseport", 0)))["grpc.so_reuseport"] == 0
    assert ("grpc.keepalive_permit_without_calls", 1) in server_options()
