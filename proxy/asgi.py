"""Small ASGI helpers: read a bounded body, send a response, notice a client that went away."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import quote

from .errors import BodyTooLarge, FlexProxyError

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Scope = MutableMapping[str, Any]


class ClientGone(Exception):
    """The client disconnected before the proxy answered."""


class ResponseAborted(Exception):
    """A response that began cannot be completed honestly: the server must drop the connection mid-body.

    Raised out of the ASGI app on purpose; uvicorn then closes the connection without ending the body."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


# The SDKs' own deadlines: the Python SDK sends its read timeout as x-stainless-read-timeout; the Node, Go and
# Ruby SDKs send their request timeout, in seconds, as x-stainless-timeout. (The Java and .NET SDKs send none.)
_WANTED = frozenset({
    b"content-length", b"x-flex-tier", b"x-flex-policy", b"x-flex-on-unavailable", b"x-flex-deadline-s",
    b"x-stainless-read-timeout", b"x-stainless-timeout",
})  # fmt: skip


def headers_of(scope: Scope) -> dict[str, str]:
    """The request headers a model request reads, in one pass (the first of each, as `header` gives it)."""
    found: dict[str, str] = {}
    for key, value in scope["headers"]:
        if key in _WANTED and key.decode() not in found:
            found[key.decode()] = value.decode("latin-1")
    return found


def raw_path(scope: Scope) -> str:
    """The request path exactly as the client sent it (escapes untouched), without the query string."""
    raw = scope.get("raw_path")
    if raw:
        return str(raw.decode("latin-1")).partition("?")[0]
    return quote(scope["path"], safe="/:@!$&'()*+,;=-._~")


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"The request body is larger than this proxy's limit of {limit / 1048576:g} MiB (FLEX_PROXY_MAX_BODY_MB)."
    )


async def read_body(receive: Receive, limit: int, declared: str | None) -> bytes:
    """The whole request body, refusing more than `limit` bytes before reading them where possible."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def stream_body(receive: Receive, on_end: Callable[[], None]) -> AsyncIterator[bytes]:
    """The request body as it arrives, for pass-through; `on_end` runs once it has all been read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            on_end()
            return


class DisconnectGuard:
    """Cancels the request's task when the client disconnects, so no retry or upstream read outlives it.

    Disarm before the final send: uvicorn reports a disconnect as soon as a response is complete. A disarmed
    watcher is not cancelled: it ends by itself on that same report (or on the connection's end), which costs less
    than a cancellation thrown through uvicorn's `receive`.
    """

    __slots__ = ("_receive", "_watcher", "_work", "fired")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watcher: asyncio.Future[Message] | None = None
        self._work: asyncio.Task[Any] | None = None
        self.fired = False

    def watch(self, work: asyncio.Task[Any] | None) -> None:
        self._work = work

    def arm(self) -> None:
        if self._watcher is None and self._work is not None:
            # The server's own `receive` as the task, with a callback: no coroutine of ours held per request.
            self._watcher = asyncio.ensure_future(self._receive())
            self._watcher.add_done_callback(self._heard)

    def disarm(self) -> None:
        self._work = None

    def _heard(self, watcher: asyncio.Future[Message]) -> None:
        if watcher.cancelled() or watcher.exception() is not None:
            return
        if watcher.result()["type"] != "http.disconnect":
            self._watcher = None
            self.arm()  # not the end yet: listen on
            return
        if self._work is not None and not self._work.done():
            self.fired = True
            self._work.cancel()


def new_request_id() -> str:
    """An id for an error the proxy makes itself, shaped like upstream's (`req_` and hex) but telling them apart."""
    return "req_flexproxy_" + secrets.token_hex(12)


class Responder:
    """Sends one HTTP response and remembers whether it has started (after which no status can change)."""

    __slots__ = ("_guard", "_on_finish", "_send", "error_event", "error_id", "started")

    def __init__(self, send: Send, guard: DisconnectGuard, on_finish: Callable[[str | None], None]) -> None:
        self._send = send
        self._guard = guard
        # Given the error id, once: just before the last byte (so a client that has its answer sees it counted), or
        # at the end of a request that never finished its answer.
        self._on_finish: Callable[[str | None], None] | None = on_finish
        self.started = False
        # For a started stream: the in-band error event that ends it honestly (set by whoever streams).
        self.error_event: Callable[[str, str], bytes] | None = None
        self.error_id: str | None = None  # the x-request-id of the proxy's own error, once one is sent

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes) -> None:
        if data:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})

    def settle(self) -> None:
        """Run `on_finish` if it has not run yet."""
        on_finish, self._on_finish = self._on_finish, None
        if on_finish is not None:
            on_finish(self.error_id)

    async def finish(self, data: bytes = b"") -> None:
        self._guard.disarm()
        self.settle()
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def error(self, exc: FlexProxyError, headers: list[tuple[bytes, bytes]], *, retry: bool = False) -> None:
        """The proxy's own OpenAI-shaped error, marked final for the SDK unless `retry`, with a request id of its
        own for the log line to match; nothing if the response has begun."""
        if not self.started:
            self.error_id = new_request_id()
            base = [
                (b"content-type", b"application/json"), (b"x-should-retry", b"true" if retry else b"false"),
                (b"x-request-id", self.error_id.encode()),
            ]  # fmt: skip
            await self.whole(exc.status, base + headers, exc.body())

    async def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await self.start(status, headers)
        await self.finish(body)
