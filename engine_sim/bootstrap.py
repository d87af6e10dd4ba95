"""SGLang's disaggregated-serving request protocol (``bootstrap_host/port/room``), as engine_sim
speaks it.

In SGLang's PD mode the router (sglang-router ``--pd-disaggregation``, SGLang's mini load
balancer, kvroute's gateway) picks a prefill and a decode server, adds three fields to the
request body and sends the **same body to both at once**: ``bootstrap_host`` (the prefill
server's host), ``bootstrap_port`` (its bootstrap server's port, configured per prefill worker,
e.g. ``--prefill URL PORT``; null when unknown) and ``bootstrap_room`` (a random integer in
0..2^63-1 naming this one transfer). The prefill server computes the prompt; the decode server
finds the prefill through the bootstrap server, receives the KV for the room and generates. The
router streams the decode answer and drains the prefill one.

engine_sim models it without moving bytes (its caches hold hashes, not tensors):

- Which half an engine plays for such a request: its ``--role`` (prefill / decode); an
  aggregated ``both`` engine is the prefill when the bootstrap port is its own HTTP port, the
  decode otherwise. **engine_sim's bootstrap server is its HTTP port**, so give each prefill
  engine's HTTP port as its bootstrap port.
- Prefill half: runs the prompt with one output token (SGLang's prefill server stops after the
  prefill whatever ``max_tokens`` says) and, once the prefill is done (model time), marks the
  room done in :class:`BootstrapRooms`; a prefill that fails or is aborted marks it failed.
- Decode half: long-polls ``GET /kvroute/bootstrap/rooms/{room}`` on the prefill engine
  (:class:`BootstrapClient`) until the room is done, then queues the request as vLLM's
  ``do_remote_prefill`` does: the blocks its cache lacks are received
  (``--transfer-ms-per-block`` each), stored and published as BlockStored. The model seconds it
  waited are in its record (``kv_wait_s``). A failed or unreachable prefill, or no prefill
  within ``--bootstrap-timeout-s``, answers 503 naming the room and the prefill engine.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aiohttp

ROOM_MAX = 2**63 - 1


class BootstrapError(Exception):
    """The KV of a decode request could not be obtained (HTTP 503 to the client)."""


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """A request's SGLang PD fields."""

    host: str
    port: int | None
    room: int


def parse(body: dict[str, Any]) -> Bootstrap | None:
    """The request's bootstrap fields (None when it has no ``bootstrap_room``); ValueError for
    malformed ones."""
    room = body.get("bootstrap_room")
    if room is None:
        return None
    if isinstance(room, list) or isinstance(body.get("bootstrap_host"), list):
        raise ValueError("bootstrap_room: batched requests are not supported (one prompt per "
                         "request)")
    if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room <= ROOM_MAX:
        raise ValueError(f"bootstrap_room must be an integer in 0..{ROOM_MAX}")
    host = body.get("bootstrap_host")
    if not isinstance(host, str) or not host:
        raise ValueError("bootstrap_host must be the prefill server's host (a string)")
    port = body.get("bootstrap_port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                             or not 1 <= port <= 65535):
        raise ValueError("bootstrap_port must be a port number (1..65535) or null")
    if body.get("kv_transfer_params") is not None:
        raise ValueError("a request carries either SGLang's bootstrap_room or vLLM's "
                         "kv_transfer_params, not both")
    return Bootstrap(host, port, room)


def is_prefill_side(boot: Bootstrap, role: str, own_port: int) -> bool:
    """Whether this engine runs the prefill half of ``boot`` (module docstring)."""
    if role in ("prefill", "decode"):
        return role == "prefill"
    return boot.port == own_port


class _Room:
    __slots__ = ("created", "done")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.created = time.monotonic()
        self.done: asyncio.Future[dict[str, Any]] = loop.create_future()


class BootstrapRooms:
    """The prefill side's rooms: pending, done (with what the decode needs) or failed.

    Bounded: at most ``max_rooms`` are kept, each for ``ttl_s`` wall seconds (a room whose
    decode never came is forgotten).
    """

    def __init__(self, ttl_s: float = 600.0, max_rooms: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_rooms = max_rooms
        self._rooms: OrderedDict[int, _Room] = OrderedDict()
        self.done_total = 0
        self.failed_total = 0

    def _get(self, room: int) -> _Room:
        found = self._rooms.get(room)
        if found is not None:
            return found
        now = time.monotonic()
        while self._rooms and (len(self._rooms) >= self.max_rooms or
                               next(iter(self._rooms.values())).created < now - self.ttl_s):
            self._rooms.popitem(last=False)
        made = self._rooms[room] = _Room(asyncio.get_running_loop())
        return made

    def done(self, room: int, info: dict[str, Any]) -> None:
        """The prefill of ``room`` finished: its KV is ready for the decode."""
        fut = self._get(room).done
        if not fut.done():
            fut.set_result({"status": "done", **info})
            self.done_total += 1

    def fail(self, room: int, message: str) -> None:
        """The prefill of ``room`` failed or was aborted."""
        fut = self._get(room).done
        if not fut.done():
            fut.set_result({"status": "failed", "message": message})
            self.failed_total += 1

    async def wait(self, room: int, wait_s: float) -> dict[str, Any]:
        """The room's state, waiting up to ``wait_s`` for it to leave ``pending``."""
        fut = self._get(room).done
        try:
            async with asyncio.timeout(max(0.0, wait_s)):
                return await asyncio.shield(fut)
        except TimeoutError:
            return {"status": "pending"}


class BootstrapClient:
    """The decode side: waits for a room on the prefill engine's bootstrap server."""

    def __init__(self, poll_s: float = 10.0) -> None:
        self.poll_s = poll_s
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait(self, boot: Bootstrap, timeout_s: float) -> dict[str, Any]:
        """The prefill's ``done`` record of ``boot.room``; BootstrapError when it failed, is
        unreachable, or does not finish within ``timeout_s`` wall seconds."""
        if boot.port is None:
            raise BootstrapError(
                "bootstrap_port is null: the decode engine cannot find the prefill (configure "
                "the prefill worker's bootstrap port; engine_sim's is its HTTP port)")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        host = f"[{boot.host}]" if ":" in boot.host else boot.host
        url = f"http://{host}:{boot.port}/kvroute/bootstrap/rooms/{boot.room}"
        where = f"prefill engine {boot.host}:{boot.port}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise BootstrapError(f"room {boot.room}: the prefill on the {where} did not "
                                     f"finish within {timeout_s:g} s (--bootstrap-timeout-s)")
            step = min(left, self.poll_s)
            try:
                async with self._session.get(
                        url, params={"wait_s": f"{step:.3f}"},
                        timeout=aiohttp.ClientTimeout(total=step + 5.0)) as resp:
                    data = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise BootstrapError(f"room {boot.room}: cannot reach the bootstrap server of "
                                     f"the {where}: {type(exc).__name__}: {exc}") from None
            status = data.get("status") if isinstance(data, dict) else None
            if status == "done":
                return dict(data)
            if status == "failed":
                raise BootstrapError(f"room {boot.room}: the prefill on the {where} failed: "
                                     f"{data.get('message', '')}")
            if status != "pending":
                raise BootstrapError(f"room {boot.room}: unexpected answer from the {where}: "
                                     f"{str(data)[:200]}")
