"""Every /v1 request that is not a model request: forwarded unchanged, bodies streamed both ways."""

from __future__ import annotations

from .accounting import Record
from .asgi import ClientGone, DisconnectGuard, Receive, Responder, Scope, header, stream_body
from .errors import UpstreamError
from .upstream import Upstream, request_headers, response_headers


async def passthrough(
    upstream: Upstream,
    scope: Scope,
    receive: Receive,
    rec: Record,
    out: Responder,
    guard: DisconnectGuard,
    authorization: str | None,
) -> None:
    """One attempt, no retries: these endpoints are not all idempotent (uploads, batch creation)."""
    headers = request_headers(scope["headers"], authorization)
    length = header(scope, b"content-length")
    chunked = (header(scope, b"transfer-encoding") or "").lower() == "chunked"
    body = None
    if (length is not None and length != "0") or chunked:
        body = stream_body(receive, guard.arm)  # watch for a disconnect once the body is all read
        if length is not None:
            headers["content-length"] = length
    else:
        guard.arm()
    rec.attempts = 1
    try:
        response = await upstream.send(scope["method"], rec.path + query(scope), headers, body)
    except UpstreamError as exc:
        rec.outcome = exc.outcome
        rec.status = exc.status
        await out.error(exc, rec.flex_headers())
        return
    except ClientGone:
        rec.outcome = "client_disconnected"
        return
    try:
        rec.status = response.status
        rec.request_id = response.headers.get("x-request-id")
        rec.outcome = "ok" if response.status < 400 else "upstream_error"
        await out.start(response.status, [*response_headers(response.headers), (b"x-flex-attempts", b"1")])
        try:
            async for chunk in response.chunks():
                await out.write(chunk)
        except UpstreamError:
            rec.outcome = "stream_cut"  # the status is sent: all that is left is to end the body early
        await out.finish()
    finally:
        response.close()


def query(scope: Scope) -> str:
    """The query string as the client sent it, with its `?`."""
    raw: bytes = scope["query_string"]
    return "?" + raw.decode("latin-1") if raw else ""
