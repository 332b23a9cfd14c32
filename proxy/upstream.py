"""The only module that talks to the upstream HTTP client (aiohttp): pool, timeouts, header hygiene, errors.

aiohttp was chosen by measurement (when the stack was chosen: ~6,000 req/s through a minimal proxy against ~800 for
httpx's default transport), and because flex requests hold connections for minutes, so the pool must be
large and cheap. Everything aiohttp-specific stays here so the choice can change.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import socket
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import (
    ClientError,
    UpstreamDropped,
    UpstreamError,
    UpstreamIncomplete,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .rewrite import Parts

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy recomputes or must not pass on.
_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding", "cookie",
    "expect",
})  # fmt: skip
_CHUNK = 1 << 20  # aiohttp would rather not send bodies over 1 MiB in one write
# Headers aiohttp would add of its own when the client sent none (`Accept: */*`, `Content-Type:
# application/octet-stream`, its User-Agent): upstream gets the client's headers and no others. A model request
# keeps aiohttp's Accept-Encoding, since the proxy decodes that answer itself; a pass-through sends the client's.
_NO_AUTO = ("User-Agent", "Accept", "Content-Type")
_NO_AUTO_RAW = (*_NO_AUTO, "Accept-Encoding")


async def _pieces(parts: Parts) -> AsyncIterator[bytes | memoryview]:
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), _CHUNK):
            yield view[start : start + _CHUNK]


_RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"content-encoding", b"set-cookie", b"date", b"server",
})  # fmt: skip
# A pass-through answer keeps its length and encoding: its body goes on as the bytes that came.
_RAW_RESPONSE_DROP = _RESPONSE_DROP - {b"content-length", b"content-encoding"}


def request_headers(
    headers: Iterable[tuple[bytes, bytes]], authorization: str | None, *, raw: bool = False
) -> CIMultiDict[str]:
    """Client headers fit to send upstream: no hop-by-hop, no cookies, no X-Flex-*, the chosen key.

    `raw` (pass-through) keeps the client's accept-encoding, since the answer goes back undecoded."""
    out: CIMultiDict[str] = CIMultiDict()
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name in _HOP and not (raw and name == "accept-encoding"):
            continue
        if name == "authorization" or name.startswith("x-flex-"):
            continue
        try:
            value = raw_value.decode("ascii") if raw_value.isascii() else raw_value.decode("utf-8")
        except UnicodeDecodeError:
            # aiohttp writes header values as UTF-8: other bytes could not reach upstream as they were sent.
            raise ClientError(f"The {name} header is not valid UTF-8.", param=name, code="invalid_header") from None
        out.add(name, value)
    if authorization:
        out["authorization"] = authorization
    return out


def response_headers(raw_headers: Iterable[tuple[bytes, bytes]], *, raw: bool = False) -> list[tuple[bytes, bytes]]:
    """Upstream headers fit to send to the client, as the bytes that came (a UTF-8 filename stays UTF-8)."""
    drop = _RAW_RESPONSE_DROP if raw else _RESPONSE_DROP
    return [(name.lower(), value) for name, value in raw_headers if name.lower() not in drop]


@dataclass(frozen=True)
class Keepalive:
    """TCP keepalive for upstream sockets: a flex answer is silent for minutes, and a NAT on the way forgets an
    idle connection (AWS NAT gateway after 350 s), losing an answer upstream has done and billed."""

    idle_s: int = 60  # silence before the first probe
    interval_s: int = 15  # between probes
    count: int = 4  # unanswered probes before the connection is declared dead


# TCP_KEEPIDLE is Linux's (and Windows') name; macOS calls it TCP_KEEPALIVE.
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)


def keepalive_socket(keepalive: Keepalive) -> Any:
    """A socket factory for aiohttp's connector: every upstream socket with `keepalive` set, where the platform
    has the options."""

    def make(addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in (
                (_KEEPIDLE, keepalive.idle_s),
                (getattr(socket, "TCP_KEEPINTVL", None), keepalive.interval_s),
                (getattr(socket, "TCP_KEEPCNT", None), keepalive.count),
            ):
                if option is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:
            sock.close()
            raise
        return sock

    return make


@dataclass(slots=True)
class _Exchange:
    """One attempt, as its connection sees it: whether any byte of an answer has arrived."""

    answered: bool = False


_EXCHANGE: contextvars.ContextVar[_Exchange | None] = contextvars.ContextVar("flex_proxy_exchange", default=None)


class _Handler(ResponseHandler):
    """aiohttp's protocol, noting the first byte of an answer for the attempt that is using the connection.

    A status line followed by a close or a reset surfaces from aiohttp as a plain disconnect (a reset carries no
    trace of the bytes), yet it means upstream took the request: that attempt must never be re-sent."""

    _exchange: _Exchange | None = None

    def set_response_params(self, **params: Any) -> None:
        # Called by aiohttp in the task that sends the request, once per request on this connection.
        self._exchange = _EXCHANGE.get()
        super().set_response_params(**params)

    def data_received(self, data: bytes) -> None:
        if data and self._exchange is not None:
            self._exchange.answered = True
        super().data_received(data)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's TCP connector with `_Handler` as every connection's protocol."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # `_factory` is how BaseConnector makes each connection's protocol (the same since aiohttp 1.x); the
        # fault tests fail if a release renames it.
        self._factory = cast("functools.partial[ResponseHandler]", functools.partial(_Handler, loop=self._loop))


@dataclass(slots=True)
class UpstreamResponse:
    """One upstream answer whose headers have arrived; the body is read or streamed, then `close()`d."""

    status: int
    headers: CIMultiDictProxy[str]
    _response: aiohttp.ClientResponse

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self._response.raw_headers

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _cut(exc) from exc

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """Body bytes as they arrive; errors mid-body surface as our UpstreamError types."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _cut(exc) from exc

    def close(self) -> None:
        self._response.close()


def _cut(exc: BaseException) -> UpstreamError:
    """A failure after the answer's headers: the work was done, so it is never re-sent."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The upstream API went silent in the middle of its answer.")
    return UpstreamIncomplete("The upstream API closed the connection in the middle of its answer.")


class Upstream:
    """A pooled client for one upstream base URL; `send` makes one attempt."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        idle_timeout_s: float,
        max_connections: int,
        keepalive: Keepalive = Keepalive(),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        url = URL(self.base_url)
        self.host = f"{url.host}:{url.port}" if url.port is not None else str(url.host)
        # Made once, not per attempt: a model request's wait is bounded by its caller; a pass-through's reads time out.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s)
        self._raw_timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=idle_timeout_s)
        self._max_connections = max_connections
        self._keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None

    @property
    def started(self) -> bool:
        return self._session is not None

    async def start(self) -> None:
        connector = _Connector(
            limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30,
            socket_factory=keepalive_socket(self._keepalive),
        )  # fmt: skip
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            skip_auto_headers=_NO_AUTO,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        method: str,
        path: str,
        headers: CIMultiDict[str],
        body: bytes | Parts | AsyncIterable[bytes] | None,
        *,
        raw: bool = False,
    ) -> UpstreamResponse:
        """One attempt: `path` is what follows /v1, escapes and query as the client sent them.

        The caller bounds the wait for the answer's headers. A model answer (`raw` false) is decompressed for
        reading; a pass-through answer (`raw`) is not, and its body reads time out after a silence."""
        assert self._session is not None, "Upstream.start() was not awaited"
        data: bytes | aiohttp.payload.Payload | AsyncIterable[bytes | memoryview] | AsyncIterable[bytes] | None = None
        if isinstance(body, tuple):
            size = sum(len(part) for part in body)
            if size > _CHUNK:  # sent as views of the client's bytes, never copied whole again
                headers = headers.copy()
                headers["content-length"] = str(size)
                data = _pieces(body)
            else:
                # The payload aiohttp would pick for bytes, made here: it skips aiohttp's lookup by type.
                data = aiohttp.payload.BytesPayload(b"".join(body))
            del body  # its pieces are views that need not outlive the wait for the answer
        else:
            data = body
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        exchange = _Exchange()
        token = _EXCHANGE.set(exchange)
        try:
            response = await self._session.request(
                method,
                URL(self.base_url + path, encoded=True),  # the client's own escaping, unchanged
                headers=headers,
                data=data,
                allow_redirects=False,
                auto_decompress=not raw,
                skip_auto_headers=_NO_AUTO_RAW if raw else None,
                timeout=self._raw_timeout if raw else self._timeout,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, loop.time() - sent_at, exchange.answered) from exc
        finally:
            _EXCHANGE.reset(token)
        return UpstreamResponse(response.status, response.headers, response)

    def _failure(self, exc: BaseException, elapsed: float, answered: bool) -> UpstreamError:
        """Sort a failure before the answer's headers by what upstream may have done with the request."""
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return UpstreamUnreachable(f"Could not reach the upstream API at {self.host} ({_reason(exc)}).")
        if isinstance(exc, TimeoutError):  # a pass-through's read timeout
            return UpstreamTimeout("The upstream API did not answer in time.", elapsed_s=elapsed)
        if isinstance(exc, aiohttp.ClientResponseError):
            return UpstreamIncomplete(f"The upstream API at {self.host} sent an answer the proxy could not read.")
        if answered:
            # A status line (or more) came, then the connection ended: upstream took the request, so the failure
            # is a cut answer, never re-sent, however soon it came.
            return UpstreamIncomplete(
                f"The upstream API at {self.host} began its answer, then closed the connection before its headers "
                f"were complete ({_reason(exc)}).",
                elapsed_s=elapsed,
            )
        return UpstreamDropped(
            f"The upstream API at {self.host} closed the connection before answering ({_reason(exc)}).",
            elapsed_s=elapsed,
        )


def _reason(exc: BaseException) -> str:
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    text = getattr(cause, "strerror", None) or type(cause).__name__
    return str(text)
