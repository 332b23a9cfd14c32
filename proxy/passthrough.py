"""Every /v1 request that is not a model request: forwarded unchanged, bodies streamed both ways, the answer's
bytes (and its length and encoding) passed back as they came."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from .accounting import Record
from .asgi import ClientGone, DisconnectGuard, Receive, Responder, ResponseAborted, Scope, header, stream_body
from .errors import ClientError, UpstreamError, UpstreamTimeout
from .upstream import Upstream, request_headers, response_headers


async def passthrough(
    upstream: Upstream,
    scope: Scope,
    receive: Receive,
    rec: Record,
    out: Responder,
    guard: DisconnectGuard,
    authorization: str | None,
    first_byte_timeout_s: float,
) -> None:
    """One attempt, no retries: these endpoints are not all idempotent (uploads, batch creation), and
    upstream may already have done the work when an attempt fails."""
    try:
        headers = request_headers(scope["headers"], authorization, raw=True)
    except ClientError as exc:
        rec.outcome, rec.status = "bad_request", exc.status
        await out.error(exc, rec.flex_headers())
        return
    length = header(scope, b"content-length")
    chunked = (header(scope, b"transfer-encoding") or "").lower() == "chunked"
    body = None
    upload = _Upload(receive, guard)
    if (length is not None and length != "0") or chunked:
        body = upload.chunks()  # watch for a disconnect once the body is all read
        if length is not None:
            headers["content-length"] = length
    else:
        guard.arm()
    rec.attempts = 1
    try:
        async with asyncio.timeout(first_byte_timeout_s):
            response = await upstream.send(scope["method"], rec.path + query(scope), headers, body, raw=True)
    except (UpstreamError, TimeoutError) as exc:
        if upload.gone:  # the client stopped sending its body: nothing to answer
            rec.outcome = "client_disconnected"
            return
        error = exc if isinstance(exc, UpstreamError) else UpstreamTimeout("The upstream API did not answer in time.")
        rec.outcome = error.outcome
        rec.status = error.status
        await out.error(error, rec.flex_headers())
        return
    except ClientGone:
        rec.outcome = "client_disconnected"
        return
    try:
        rec.status = response.status
        rec.request_id = response.headers.get("x-request-id")
        rec.outcome = "ok" if response.status < 400 else "upstream_error"
        answer_headers = response_headers(response.raw_headers, raw=True)
        await out.start(response.status, [*answer_headers, (b"x-flex-attempts", b"1")])
        try:
            async for chunk in response.chunks():
                await out.write(chunk)
        except UpstreamError as exc:
            # The status is sent: the only honest end left is to abort the response, so the client sees a cut
            # body (short of its content-length, or without the last chunk), never a complete-looking one.
            rec.outcome = "stream_cut"
            raise ResponseAborted(exc.message) from exc
        await out.finish()
    finally:
        response.close()


class _Upload:
    """The client's request body as it arrives, noting whether the client went away in the middle of it."""

    def __init__(self, receive: Receive, guard: DisconnectGuard) -> None:
        self._receive = receive
        self._guard = guard
        self.gone = False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream_body(self._receive, self._guard.arm):
                yield chunk
        except ClientGone:
            self.gone = True
            raise


def query(scope: Scope) -> str:
    """The query string as the client sent it, with its `?`."""
    raw: bytes = scope["query_string"]
    return "?" + raw.decode("latin-1") if raw else ""
