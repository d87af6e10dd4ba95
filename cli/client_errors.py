"""Turn a failed client call into a message an operator can act on.

``UNIMPLEMENTED: Method not found!`` means the address serves something else: the server's
reflection service says what it is (a registry where a router was expected, or the reverse),
and the message names the command that talks to it. ``UNAVAILABLE`` names the address and, for a
plaintext call, the TLS flags (a TLS server closes a plaintext connection without a word).
"""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvroute.grpcutil import open_channel
from kvroute.settings import TLSSettings
from kvroute.v1 import router_pb2, router_pb2_grpc

ROUTER = "kvroute.v1.Router"
REGISTRY = "kvroute.v1.Registry"

WHAT = {
    ROUTER: ("a kvroute router", "kvroute route|complete|stats --router {t}"),
    REGISTRY: ("a kvroute registry", "kvroute nodes --registry {t}"),
}
"""For each kvroute service: how to call it, and the command that talks to it."""


async def list_services(target: str, tls: TLSSettings | None, timeout_s: float) -> list[str]:
    """Service names the server at ``target`` announces through reflection ([] if it can't)."""
    try:
        async with open_channel(target, tls) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            call = stub.ServerReflectionInfo(iter([req]), timeout=timeout_s)
            async for resp in call:
                return sorted(s.name for s in resp.list_services_response.service)
    except (TimeoutError, grpc.aio.AioRpcError):
        pass
    return []


def describe_services(names: list[str], target: str) -> str:
    """``a kvroute registry (talk to it with: kvroute nodes --registry T)`` or the raw list."""
    for name, (what, cmd) in WHAT.items():
        if name in names:
            return f"{what} (talk to it with: {cmd.format(t=target)})"
    shown = [n for n in names if not n.startswith("grpc.")]
    if shown:
        return f"a gRPC server of {', '.join(shown)}"
    if names:
        return "a gRPC server with only health and reflection (a kvroute node agent?)"
    return "a gRPC server without reflection"


async def explain(exc: grpc.aio.AioRpcError, target: str, flag: str, service: str,
                  tls: TLSSettings | None, timeout_s: float) -> str:
    """One line (or two) saying what went wrong with a call to ``service`` at ``target``."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNIMPLEMENTED and "Method not found" in details:
        names = await list_services(target, tls, timeout_s)
        want = WHAT.get(service, (service, ""))[0]
        return (f"{target} is not {want}: it does not serve {service}. It is "
                f"{describe_services(names, target)}. Point {flag} at {want}.")
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = ("" if tls is not None and tls.enabled
                else " If the server uses TLS, give --tls-ca-file (and --tls-cert-file/"
                     "--tls-key-file for mTLS).")
        return f"cannot reach {target} ({flag}): UNAVAILABLE: {details}.{hint}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"{target} ({flag}) did not answer within the deadline (--timeout): "
                f"{details}")
    return f"{target}: {code.name}: {details}"


async def router_stats(ch: grpc.aio.Channel, deadline_s: float) -> router_pb2.StatsResponse | None:
    """The router's Stats, or None when it does not answer."""
    try:
        st: router_pb2.StatsResponse = await router_pb2_grpc.RouterStub(ch).Stats(
            router_pb2.StatsRequest(), timeout=deadline_s)
    except grpc.aio.AioRpcError:
        return None
    return st


def router_not_routing(st: router_pb2.StatsResponse) -> str:
    """Why a router cannot route, from its Stats ("" when its link and nodes look fine)."""
    if not st.registry_connected:
        return (f"the router's link to its registry is DOWN (no registry data for "
                f"{st.registry_staleness_s:.1f} s, {st.nodes_known} node(s) known): check the "
                "router's --registry address and its log; `kvroute stats` shows the link")
    if not st.nodes_known:
        return ("the router reaches its registry, but no node is registered: start the node "
                "agents (`kvroute nodes --registry HOST:PORT` lists what the registry knows)")
    return ""
