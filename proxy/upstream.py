"""The only module that talks to the upstream HTTP client (aiohttp): pool, timeouts, header hygiene, errors.

aiohttp was chosen by measurement (shared/STYLE.md: ~6,000 req/s through a minimal proxy against ~800 for
httpx's default transport), and because flex requests hold connections for minutes, so the pool must be
large and cheap. Everything aiohttp-specific stays here so the choice can change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from .rewrite import Parts

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy recomputes or must not pass on.
_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding", "cookie",
    "expect",
})  # fmt: skip
_CHUNK = 1 << 20  # aiohttp would rather not send bodies over 1 MiB in one write


async def _pieces(parts: Parts) -> AsyncIterator[bytes | memoryview]:
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), _CHUNK):
            yield view[start : start + _CHUNK]


_RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "set-cookie", "date", "server",
})  # fmt: skip


def request_headers(headers: Iterable[tuple[bytes, bytes]], authorization: str | None) -> CIMultiDict[str]:
    """Client headers fit to send upstream: no hop-by-hop, no cookies, no X-Flex-*, the chosen key."""
    out: CIMultiDict[str] = CIMultiDict()
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name in _HOP or name == "authorization" or name.startswith("x-flex-"):
            continue
        out.add(name, raw_value.decode("latin-1"))
    if authorization:
        out["authorization"] = authorization
    return out


def response_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Upstream headers fit to send to the client; content-length and encoding are the proxy's own."""
    return [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in headers.items()
        if name.lower() not in _RESPONSE_DROP
    ]


@dataclass
class UpstreamResponse:
    """One upstream answer whose headers have arrived; the body is read or streamed, then `close()`d."""

    status: int
    headers: CIMultiDictProxy[str]
    _response: aiohttp.ClientResponse

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc) from exc

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """Body bytes as they arrive; errors mid-body surface as our UpstreamError types."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc) from exc

    def close(self) -> None:
        self._response.close()


def _translate(exc: BaseException) -> UpstreamError:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout("The upstream API did not answer in time.")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamUnreachable("The upstream API closed the connection in the middle of its answer.")
    return UpstreamUnreachable(f"Could not reach the upstream API ({type(exc).__name__}).")


class Upstream:
    """A pooled client for one upstream base URL; `send` makes one attempt."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout_s),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
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
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """One attempt: `path` is what follows /v1 (with its query string). The read timeout is per chunk."""
        assert self._session is not None, "Upstream.start() was not awaited"
        read_timeout = self._timeout_s if timeout_s is None else max(0.001, min(timeout_s, self._timeout_s))
        data: bytes | AsyncIterable[bytes | memoryview] | AsyncIterable[bytes] | None = None
        if isinstance(body, tuple):
            size = sum(len(part) for part in body)
            if size > _CHUNK:  # sent as views of the client's bytes, never copied whole again
                headers = headers.copy()
                headers["content-length"] = str(size)
                data = _pieces(body)
            else:
                data = b"".join(body)
        else:
            data = body
        try:
            response = await self._session.request(
                method,
                URL(self.base_url + path, encoded=True),  # the client's own escaping, unchanged
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self._connect_timeout_s, sock_read=read_timeout
                ),
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc) from exc
        return UpstreamResponse(response.status, response.headers, response)
