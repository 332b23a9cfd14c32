"""Small aiohttp helpers every handler shares: admitting (recording, auth), JSON answers, closing."""

from __future__ import annotations

import asyncio
import contextvars
import json
import socket
import struct
from typing import Any

from aiohttp import web

from . import errors
from .simulator import RecordedRequest, Simulator

# SO_LINGER on with a zero timeout: close() discards unsent data and sends RST instead of FIN.
_LINGER_ZERO = struct.pack("ii", 1, 0)
# A middleware (wire.guard) opens a slot for each request and admit() puts the recorded request in it, so the
# middleware can tell how the exchange ended. A context variable, as aiohttp runs a request in one task.
recorded_slot: contextvars.ContextVar[list[RecordedRequest]] = contextvars.ContextVar("flex_sim_recorded")


class Closed(web.Response):
    """What a handler returns once the connection is closed: aiohttp finds nothing to send it on."""

    def __init__(self) -> None:
        super().__init__(status=499)


async def admit(sim: Simulator, request: web.Request) -> RecordedRequest | web.Response:
    """Record the request, then check the bearer token; a refusal comes back as the answer to send.

    A client that leaves mid-upload is recorded too (outcome `upload_aborted`, the body empty).
    """
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    # Raw path and query, as they arrived on the wire: the proxy must forward them byte for byte.
    url = request.rel_url
    try:
        body = await request.read()
    except (asyncio.CancelledError, ConnectionError, web.HTTPException) as exc:
        if not peer_gone(request) and not isinstance(exc, ConnectionError):
            raise
        aborted = sim.record(request.method, url.raw_path, url.raw_query_string, headers, b"")
        aborted.outcome = "upload_aborted"
        sim.count("upload_aborted")
        sim.end(aborted, by_peer=True)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return Closed()
    recorded = sim.record(request.method, url.raw_path, url.raw_query_string, headers, body)
    recorded_slot.get([]).append(recorded)
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


def peer_gone(request: web.BaseRequest) -> bool:
    """Whether the client's connection is lost (aiohttp drops the transport in connection_lost)."""
    return request.transport is None


def close(request: web.BaseRequest, sim: Simulator, recorded: RecordedRequest | None, *, reset: bool = False) -> Closed:
    """Close the connection now, with FIN, or with RST when `reset`; the simulator has then finished."""
    if recorded is not None:
        sim.end(recorded, by_peer=False)
    transport = request.transport
    if transport is not None:
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            transport.abort()
        else:
            transport.close()
    return Closed()
