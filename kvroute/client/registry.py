"""Typed clients of ``kvroute.v1.Registry`` (read side): :class:`RegistryClient` (blocking) and
:class:`AsyncRegistryClient` (asyncio), failing over between several registry replicas."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from kvroute.client.base import AsyncCaller, SyncCaller
from kvroute.client.options import ClientOptions
from kvroute.client.types import Node
from kvroute.v1 import registry_pb2, registry_pb2_grpc


def _lookup_request(block_hashes: Sequence[int], model: str,
                    matched_only: bool) -> registry_pb2.LookupRequest:
    return registry_pb2.LookupRequest(block_hashes=list(block_hashes), model=model,
                                      matched_only=matched_only)


class RegistryClient:
    """Blocking Registry client; errors raise :mod:`kvroute.errors` types."""

    def __init__(self, options: ClientOptions) -> None:
        self._c = SyncCaller(options, registry_pb2_grpc.RegistryStub)

    def list_nodes(self, model: str = "", timeout_s: float | None = None) -> list[Node]:
        """Every registered node (of ``model`` when given)."""
        resp = self._c.call("ListNodes", registry_pb2.ListNodesRequest(model=model), timeout_s)
        return [Node.from_pb(n) for n in resp.nodes]

    def lookup(self, block_hashes: Sequence[int], model: str = "",
               timeout_s: float | None = None, *, matched_only: bool = False,
               ) -> dict[str, int]:
        """Matched prefix length in blocks per healthy node of ``model`` (0 for nodes holding
        none of it); ``matched_only``: only the nodes holding a prefix (the answer then does
        not grow with the fleet)."""
        resp = self._c.call("Lookup", _lookup_request(block_hashes, model, matched_only),
                            timeout_s)
        return {n.node_id: n.matched_blocks for n in resp.nodes}

    def close(self) -> None:
        """Close the channels."""
        self._c.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncRegistryClient:
    """asyncio Registry client; same methods as :class:`RegistryClient`, awaited."""

    def __init__(self, options: ClientOptions) -> None:
        self._c = AsyncCaller(options, registry_pb2_grpc.RegistryStub)

    async def list_nodes(self, model: str = "", timeout_s: float | None = None) -> list[Node]:
        """Every registered node (of ``model`` when given)."""
        resp = await self._c.call("ListNodes", registry_pb2.ListNodesRequest(model=model),
                                  timeout_s)
        return [Node.from_pb(n) for n in resp.nodes]

    async def lookup(self, block_hashes: Sequence[int], model: str = "",
                     timeout_s: float | None = None, *, matched_only: bool = False,
                     ) -> dict[str, int]:
        """See :meth:`RegistryClient.lookup`."""
        resp = await self._c.call("Lookup", _lookup_request(block_hashes, model, matched_only),
                                  timeout_s)
        return {n.node_id: n.matched_blocks for n in resp.nodes}

    async def close(self) -> None:
        """Close the channels."""
        await self._c.close()

    async def __aenter__(self) -> AsyncRegistryClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
