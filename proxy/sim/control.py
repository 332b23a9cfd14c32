"""Control endpoints under /_sim for driving a simulator in another process (benchmark, README demo)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from aiohttp import web

from . import errors
from .http import json_response
from .options import Reply
from .simulator import Simulator


class ControlEndpoints:
    """The /_sim endpoints: POST script, reset, release; GET stats, billing, requests; GET|POST options."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/_sim/script", self.script),
            web.post("/_sim/reset", self.reset),
            web.post("/_sim/release", self.release),
            web.get("/_sim/stats", self.stats),
            web.get("/_sim/billing", self.billing),
            web.get("/_sim/requests", self.requests),
            web.get("/_sim/options", self.get_options),
            web.post("/_sim/options", self.set_options),
        ]

    async def script(self, request: web.Request) -> web.Response:
        """Queue replies given as a JSON list of Reply fields (`body` as text)."""
        data = await _json(request)
        items = data if isinstance(data, list) else [data]
        try:
            replies = [_reply(item) for item in items]
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        self.sim.script(*replies)
        return json_response(200, {"scripted": len(replies), "pending": self.sim.pending})

    async def reset(self, request: web.Request) -> web.Response:
        self.sim.reset()
        return json_response(200, {"reset": True})

    async def release(self, request: web.Request) -> web.Response:
        """End the silences going on now (hangs, stalls, slow first tokens)."""
        return json_response(200, {"released": self.sim.release_hangs()})

    async def stats(self, request: web.Request) -> web.Response:
        return json_response(200, {**self.sim.stats(), "open_connections": self.sim.open_connections})

    async def billing(self, request: web.Request) -> web.Response:
        billed = self.sim.billing()
        return json_response(200, {**dataclasses.asdict(billed), "undelivered": billed.undelivered})

    async def requests(self, request: web.Request) -> web.Response:
        """The last `limit` (default 100) recorded requests, without bodies."""
        try:
            limit = max(0, int(request.query.get("limit", "100")))
        except ValueError:
            return _bad("limit must be an integer")
        recorded = self.sim.requests[-limit:] if limit else []
        return json_response(200, [item.summary() for item in recorded])

    async def get_options(self, request: web.Request) -> web.Response:
        options = dataclasses.asdict(self.sim.options)
        if options["api_key"] is not None:
            options["api_key"] = "present"
        return json_response(200, options)

    async def set_options(self, request: web.Request) -> web.Response:
        """Change some options, given as a JSON object of SimOptions fields."""
        data = await _json(request)
        if not isinstance(data, dict):
            return _bad("expected a JSON object of SimOptions fields")
        changes: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            self.sim.options = dataclasses.replace(self.sim.options, **changes)
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        return await self.get_options(request)


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except ValueError:
        return None


def _reply(item: Any) -> Reply:
    if not isinstance(item, dict):
        raise TypeError("each reply must be a JSON object of Reply fields")
    if isinstance(item.get("body"), str):
        item = {**item, "body": item["body"].encode()}
    return Reply(**item)


def _bad(message: str) -> web.Response:
    return json_response(400, errors.envelope(message, "invalid_request_error"))
