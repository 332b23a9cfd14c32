"""Acting a reply out on the wire: whole or partial bodies, event streams, releasable silences.

Senders mark on the recorded request when its usage reached the client (`Simulator.deliver`); the `guard`
middleware marks how the exchange ended (`Simulator.end`): finished by the simulator, or closed by the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from .http import Closed, close, peer_gone, recorded_slot
from .shapes import StreamPlan
from .simulator import RecordedRequest, Simulator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


async def silence(sim: Simulator, seconds: float) -> None:
    """Wait `seconds`, or less if the test calls `sim.release_hangs()`."""
    release = asyncio.Event()
    token = sim.add_silence(asyncio.get_running_loop(), release)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), seconds)
    finally:
        sim.remove_silence(token)


def guard(sim: Simulator) -> Middleware:
    """Middleware: send what a handler returns, then note whether the exchange finished or the peer left first.

    Handlers that admit a request (http.admit) are followed; the rest pass untouched.
    """

    @web.middleware
    async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        slot: list[RecordedRequest] = []
        recorded_slot.set(slot)
        try:
            response = await handler(request)
            if slot and not isinstance(response, Closed):
                await response.prepare(request)
                await response.write_eof()
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the connection is lost (handler_cancellation), and at stop.
            if slot and peer_gone(request):
                sim.end(slot[0], by_peer=True)
            raise
        except ConnectionError:
            if not slot:
                raise
            sim.end(slot[0], by_peer=True)
            return Closed()
        if slot:
            sim.end(slot[0], by_peer=False)
        return response

    return guarded


async def body(
    request: web.Request,
    sim: Simulator,
    recorded: RecordedRequest,
    response: web.StreamResponse,
    data: bytes,
    *,
    cut: bool = False,
    stall_s: float | None = None,
    on_usage: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """Send `data` with its full content-length; `cut`: half, then close; `stall_s`: half, a silence, the rest.

    The body is taken to carry the usage: it counts as delivered once all of it is written.
    """
    response.content_length = len(data)
    await response.prepare(request)
    half = len(data) // 2
    if cut:
        await response.write(data[:half])
        return close(request, sim, recorded)
    if stall_s is not None:
        await response.write(data[:half])
        await silence(sim, stall_s)
        data = data[half:]
    if on_usage is not None:
        on_usage()
    await response.write(data)
    await response.write_eof()
    sim.deliver(recorded)
    return response


def json_body(status: int, headers: dict[str, str]) -> web.StreamResponse:
    return web.StreamResponse(status=status, headers={"content-type": "application/json", **headers})


async def stream(
    request: web.Request,
    sim: Simulator,
    recorded: RecordedRequest,
    status: int,
    headers: dict[str, str],
    plan: StreamPlan,
) -> web.StreamResponse:
    """Send the events of `plan` on a fresh event-stream response, pausing, cutting or stalling as it says."""
    response = web.StreamResponse(status=status, headers={**SSE_HEADERS, **headers})
    if plan.close_after:
        response.force_close()  # before prepare, so the headers say `connection: close`
    await response.prepare(request)
    if plan.first_delay_s:
        await silence(sim, plan.first_delay_s)
    for index, event in enumerate(plan.events):
        if index == plan.cut_after:
            return close(request, sim, recorded)
        if index == plan.stall_after:
            await silence(sim, plan.stall_s)
        elif index and plan.interval_s:
            await asyncio.sleep(plan.interval_s)
        if index == plan.usage_at and plan.on_usage is not None:
            plan.on_usage()
        await response.write(event)
        if index == plan.usage_at:
            sim.deliver(recorded)
    await response.write_eof()
    return response
