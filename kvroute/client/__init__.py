"""Typed kvroute clients (sync and asyncio) for Router and Registry: deadlines, retries with
jittered back-off, TLS/mTLS, several replica addresses. See ``kvroute/client/README.md``."""

from kvroute.client.options import ClientOptions
from kvroute.client.registry import AsyncRegistryClient, RegistryClient
from kvroute.client.router import AsyncRouterClient, RouterClient
from kvroute.client.types import Node, Route

__all__ = ["AsyncRegistryClient", "AsyncRouterClient", "ClientOptions", "Node",
           "RegistryClient", "Route", "RouterClient"]
