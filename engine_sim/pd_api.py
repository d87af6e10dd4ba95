"""The two halves of an SGLang-style disaggregated request on one engine_sim engine (HTTP side).

:mod:`engine_sim.bootstrap` describes the protocol; this module wires it into the HTTP API:
:meth:`PdHalves.side` reads a request's bootstrap fields and decides which half this engine
runs, :meth:`PdHalves.receive` makes a decode half wait for its prefill,
:meth:`PdHalves.prefilled` marks a prefill half's room done once the prefill ends (model time),
:meth:`PdHalves.failed` marks it failed when the request errs or is aborted (the one place a
room fails: the HTTP routes call it for every request that ends in an exception), and
:meth:`PdHalves.rooms_handler` serves ``GET /kvroute/bootstrap/rooms/{room}?wait_s=S`` (the
engine's bootstrap server, on its HTTP port).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine_sim.bootstrap import (
    ROOM_MAX,
    Bootstrap,
    BootstrapClient,
    BootstrapRooms,
    is_prefill_side,
    parse,
)
from engine_sim.engine import SimEngine
from engine_sim.model import SimRequest

MAX_WAIT_S = 30.0
"""Longest single long-poll on the bootstrap server."""


@dataclass(frozen=True, slots=True)
class Half:
    """The half of an SGLang PD request this engine runs."""

    boot: Bootstrap
    prefill: bool


HALF_KEY = web.RequestKey("kvroute_pd_half", Half)
"""Set on a request that carries bootstrap fields (for :meth:`PdHalves.failed`)."""


class PdHalves:
    """SGLang PD state of one engine: its rooms (prefill side) and its bootstrap client."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.rooms = BootstrapRooms()
        self.client = BootstrapClient()

    def side(self, request: web.Request, body: dict[str, Any]) -> Half | None:
        """The half this engine runs for ``body`` (None: not an SGLang PD request);
        ValueError for malformed bootstrap fields."""
        boot = parse(body)
        if boot is None:
            return None
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        own = int(sock[1]) if sock else (request.url.port or 0)
        half = Half(boot, is_prefill_side(boot, self.engine.settings.role, own))
        request[HALF_KEY] = half
        return half

    async def receive(self, half: Half, prompt_tokens: int) -> float:
        """Decode half: wait until the prefill of the room is done; model seconds waited.

        Raises :class:`engine_sim.bootstrap.BootstrapError` (no KV) or ValueError (the prefill
        computed another prompt)."""
        t0 = self.engine.now()
        info = await self.client.wait(half.boot, self.engine.settings.bootstrap_timeout_s)
        seen = info.get("prompt_tokens")
        if isinstance(seen, int) and seen != prompt_tokens:
            raise ValueError(f"bootstrap_room {half.boot.room}: the prefill engine computed "
                             f"{seen} prompt tokens, this request has {prompt_tokens}; the "
                             f"router must send the same prompt to both halves")
        return self.engine.now() - t0

    async def prefilled(self, half: Half, req: SimRequest) -> None:
        """Prefill half: at the end of the prefill (model time) the room's KV is ready. A
        prefill cut short is aborted in the engine (its room fails in :meth:`failed`)."""
        try:
            await self.engine.sleep_until(req.first_token_at or 0.0)
        except BaseException:
            self.engine.abort(req)
            raise
        self.rooms.done(half.boot.room, {"prompt_tokens": req.prompt_tokens,
                                         "cached_tokens": req.cached_tokens,
                                         "engine_request_id": req.request_id})

    def failed(self, request: web.Request, exc: BaseException) -> None:
        """A request ended in an error: a prefill half fails its room (the decode stops
        waiting)."""
        half = request.get(HALF_KEY)
        if half is not None and half.prefill:
            why = ("the prefill request was aborted (its client went away)"
                   if isinstance(exc, asyncio.CancelledError)
                   else f"{type(exc).__name__}: {exc}"[:500])
            self.rooms.fail(half.boot.room, why)

    async def rooms_handler(self, request: web.Request) -> web.Response:
        """``GET /kvroute/bootstrap/rooms/{room}?wait_s=S``: ``{"status": "pending" | "done" |
        "failed", ...}``, waiting up to S seconds (at most 30) for a pending room."""
        try:
            room = int(request.match_info["room"])
            wait_s = float(request.query.get("wait_s", "0"))
        except ValueError:
            return web.json_response({"status": "error", "message": "room must be an integer "
                                      "and wait_s a number"}, status=400)
        if not 0 <= room <= ROOM_MAX or wait_s < 0:
            return web.json_response({"status": "error", "message": f"room must be in "
                                      f"0..{ROOM_MAX} and wait_s >= 0"}, status=400)
        return web.json_response(await self.rooms.wait(room, min(wait_s, MAX_WAIT_S)))

    async def close(self) -> None:
        """Close the bootstrap client (app cleanup)."""
        await self.client.close()

