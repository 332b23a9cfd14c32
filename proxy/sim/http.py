"""Small aiohttp helpers every handler shares: admitting (recording, auth), JSON answers, dropping."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from . import errors
from .simulator import RecordedRequest, Simulator


async def admit(sim: Simulator, request: web.Request) -> RecordedRequest | web.Response:
    """Record the request, then check the bearer token; a refusal comes back as the 401 to send."""
    body = await request.read()
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    # Raw path and query, as they arrived on the wire: the proxy must forward them byte for byte.
    url = request.rel_url
    recorded = sim.record(request.method, url.raw_path, url.raw_query_string, headers, body)
    api_key = sim.options.api_key
    if api_key is not None and headers.get("authorization") != f"Bearer {api_key}":
        recorded.outcome = "unauthorized"
        sim.count("unauthorized")
        return json_response(401, errors.invalid_api_key())
    return recorded


def dump(data: Any) -> bytes:
    """Compact JSON, as OpenAI sends it."""
    return json.dumps(data, separators=(",", ":")).encode()


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer; `headers` (lower-case names) may override even the content type."""
    merged = {"content-type": "application/json", **(headers or {})}
    return web.Response(status=status, body=dump(data), headers=merged)


def drop(request: web.Request) -> web.Response:
    """Close the TCP connection without answering.

    The returned response is never sent: aiohttp finds the transport closed and gives up quietly.
    """
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)
