"""A tiny scriptable raw HTTP/1.1 upstream on 127.0.0.1, for byte-exact faults aiohttp's server cannot produce.

`handler(request, writer)` gets each request as it arrived (raw target, headers, body) and writes whatever
bytes it likes; the connection closes when it returns (one request per connection). `reset(writer)` ends it
with RST. Each request records whether the peer closed first (`peer_closed`, `gone` for the handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType


@dataclass(eq=False)
class RawRequest:
    line: bytes  # the request line without its CRLF
    method: str
    target: bytes  # the raw path and query, exactly as received
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    peer_closed: threading.Event = field(default_factory=threading.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


Handler = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[None]]


def response(status: int = 200, headers: Iterable[tuple[bytes, bytes]] = (), body: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer with content-length and `connection: close`; header bytes go out untouched."""
    lines = [b"HTTP/1.1 %d X" % status, *(k + b": " + v for k, v in headers)]
    lines += [b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with RST (SO_LINGER 0) rather than FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]]) -> bytes:
    values = {k.lower(): v for k, v in headers}
    if b"chunked" in values.get(b"transfer-encoding", b"").lower():
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")  # no trailers are expected
        return body
    return await reader.readexactly(int(values.get(b"content-length", b"0")))


class RawUpstream:
    """`with RawUpstream(handler) as up:` serves on `up.url` from a thread; `up.requests` in arrival order."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[RawRequest] = []
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="rawup", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RawUpstream:
        self._thread.start()
        if not self._ready.wait(10) or not self.port:
            raise RuntimeError("raw upstream did not start")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        try:
            server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
            self.port = server.sockets[0].getsockname()[1]
        finally:
            self._ready.set()
        async with server:
            await self._stopping.wait()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head[:-4].split(b"\r\n")
            method, target, _ = line.split(b" ", 2)
            headers = [(k.strip(), v.strip()) for k, _, v in (f.partition(b":") for f in fields)]
            request = RawRequest(line, method.decode(), target, headers, await _read_body(reader, headers))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            writer.transport.abort()
            return
        self.requests.append(request)
        watch = asyncio.create_task(self._watch(reader, writer, request))
        try:
            await self.handler(request, writer)
            if not writer.is_closing():
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            watch.cancel()
            writer.close()

    @staticmethod
    async def _watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: RawRequest) -> None:
        """Mark the request when the peer closes its side (EOF or RST) while the handler still runs."""
        try:
            while await reader.read(65536):
                pass  # a pipelined request is not served; it is read and dropped
        except ConnectionError:
            pass
        if not writer.is_closing():  # our own close is not the peer's
            request.peer_closed.set()
            request.gone.set()
