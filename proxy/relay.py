"""Give the client the answer the attempts ended with: a whole body (final errors marked final for the SDK),
or a stream relayed event by event, ended with an in-band error if upstream cuts it or goes silent."""

from __future__ import annotations

import asyncio
import math

from . import policy
from .accounting import Record, cost_headers
from .asgi import Responder
from .attempts import Answer, OpenStream
from .errors import UpstreamError
from .policy import Limits, Outcome
from .pricing import PriceTable, usage_from
from .streaming import json_object
from .upstream import response_headers

# Upstream's own retry advice is replaced on a final error: the proxy has already retried what it could.
_RETRY_ADVICE = frozenset({b"x-should-retry", b"retry-after", b"retry-after-ms"})


async def deliver(
    rec: Record, out: Responder, answer: Answer, limits: Limits, prices: PriceTable, idle_timeout_s: float
) -> None:
    response = answer.response
    rec.request_id = response.headers.get("x-request-id")
    rec.status = response.status
    headers = response_headers(response.raw_headers)
    if answer.stream is not None:
        await _relay(rec, out, headers, answer.stream, idle_timeout_s, prices)
        return
    if response.status >= 400:
        rec.outcome = answer.outcome.value if answer.outcome is not Outcome.OK else "upstream_error"
        headers = [h for h in headers if h[0] not in _RETRY_ADVICE]
        extra = [(b"x-should-retry", b"false")]
        if response.status == 429:
            extra.append((b"retry-after", retry_after_header(policy.retry_after_s(response.headers), limits)))
        await out.whole(response.status, headers + extra + rec.flex_headers(), answer.data)
        return
    body = json_object(answer.data)
    if body is not None:
        tier = body.get("service_tier")
        rec.served_tier = tier if isinstance(tier, str) else None
        rec.usage = usage_from(body)
    await out.whole(response.status, headers + rec.flex_headers() + cost_headers(rec, prices), answer.data)


def retry_after_header(seconds: float | None, limits: Limits) -> bytes:
    """One `retry-after`, in whole seconds: upstream's wait rounded up, else the proxy's suggestion."""
    if seconds is None:
        return str(policy.suggested_wait_s(limits)).encode()
    return str(max(1, math.ceil(seconds))).encode()


def cost_comment(rec: Record, prices: PriceTable) -> bytes:
    """A stream's cost headers, as the SSE comment that ends a priced stream: its headers left before its usage came.
    SSE clients, the OpenAI SDKs among them, skip comment lines."""
    priced = cost_headers(rec, prices) if rec.outcome == "ok" and rec.usage is not None else []
    if not priced:
        return b""
    return b": " + b" ".join(name + b"=" + value for name, value in priced) + b"\n\n"


async def _relay(
    rec: Record,
    out: Responder,
    headers: list[tuple[bytes, bytes]],
    stream: OpenStream,
    idle_timeout_s: float,
    prices: PriceTable,
) -> None:
    """Send the stream on event by event; a cut or silent upstream ends it with an error event, never quietly."""
    state = stream.state
    # A chat chunk names the tier that serves it; a Responses stream's opening events only echo the request's
    # (`auto`), and the tier that served it comes in its last event: no header may claim it before then.
    rec.served_tier = state.served_tier if state.kind == "chat" else None
    await out.start(rec.status, headers + rec.flex_headers(served=state.kind == "chat"))
    out.error_event = state.error_event  # so a drain that stops the proxy can still end the stream with an error
    loop = asyncio.get_running_loop()
    try:
        await out.write(b"".join(stream.pending))
        async with asyncio.timeout(None) as idle:
            while True:
                idle.reschedule(loop.time() + idle_timeout_s)  # only upstream's silence counts, not a slow client
                chunk = await anext(stream.chunks, None)
                idle.reschedule(None)
                if chunk is None:
                    break
                await out.write(b"".join(state.take(event) for event in stream.decoder.feed(chunk)))
        tail = stream.decoder.flush()
        if tail is not None:
            await out.write(state.take(tail))
    except TimeoutError:
        rec.outcome = "stream_cut"
        message = f"The upstream API sent nothing for {idle_timeout_s:g} s in the middle of the stream."
        await out.write(state.error_event(message, "stream_idle_timeout"))
    except UpstreamError as exc:
        rec.outcome = "stream_cut"
        await out.write(state.error_event(exc.message, exc.code or "upstream_error"))
    else:
        if state.error is not None:
            rec.outcome = "upstream_error"  # upstream ended it with its own error event: passed on as it came
        elif not state.complete:
            rec.outcome = "stream_cut"
            message = "The upstream API ended the stream before its last event."
            await out.write(state.error_event(message, "stream_incomplete"))
    finally:
        rec.served_tier = state.served_tier or rec.served_tier
        if state.usage_body is not None:
            rec.usage = usage_from(state.usage_body)
        elif not state.complete and state.error is None:
            rec.unread += 1  # cut, gone silent, or its client left: the usage never came
    await out.finish(cost_comment(rec, prices))
