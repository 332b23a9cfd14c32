"""Composition root of the simulated upstream: `create_sim_app(sim)` wires handlers and OpenAI headers."""

from __future__ import annotations

import contextvars
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import wire
from .answers import ModelEndpoints
from .control import ControlEndpoints
from .passthrough import PassThroughEndpoints
from .simulator import Simulator

# OpenAI accepts uploads up to 512 MB; aiohttp's default limit of 1 MiB would refuse ordinary files.
MAX_BODY_BYTES = 512 * 1024 * 1024

# Each connection is served in its own task, so a context variable carries the start time to the headers.
_started: contextvars.ContextVar[float] = contextvars.ContextVar("flex_sim_started")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_sim_app(sim: Simulator) -> web.Application:
    """An aiohttp application serving `sim` under /v1 and its control endpoints under /_sim."""
    passthrough = PassThroughEndpoints(sim)
    app = web.Application(middlewares=[_timing, wire.guard(sim), passthrough.canned], client_max_size=MAX_BODY_BYTES)
    app.add_routes(ControlEndpoints(sim).routes())
    app.add_routes(ModelEndpoints(sim).routes())
    # The pass-through routes end with the catch-alls, so they are added last.
    app.add_routes(passthrough.routes())
    app.on_response_prepare.append(_openai_headers)
    return app


@web.middleware
async def _timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    _started.set(time.monotonic())
    return await handler(request)


async def _openai_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Add the headers every OpenAI answer carries; values a handler set itself win."""
    elapsed_ms = int((time.monotonic() - _started.get(time.monotonic())) * 1000)
    defaults = {
        "x-request-id": "req_" + uuid.uuid4().hex,
        "openai-processing-ms": str(elapsed_ms),
        "openai-version": "2020-10-01",
        "openai-organization": "org-sim",
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-limit-tokens": "30000000",
        "x-ratelimit-remaining-tokens": "29999000",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-reset-tokens": "2ms",
    }
    for name, value in defaults.items():
        response.headers.setdefault(name, value)
