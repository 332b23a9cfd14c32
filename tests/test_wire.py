"""The server protocol's joined writes (proxy/wire.py), driven through uvicorn's real httptools protocol with a
transport that records what reaches the socket. The proxy's end-to-end tests run on this protocol too."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from proxy.wire import HttpProtocol, JoinedWrites

pytestmark = pytest.mark.asyncio


class Socket:
    """What uvicorn's protocol calls on a transport; records every write that reaches the socket."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.writes.append(data)
        self.events.append("write")

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        self.events.append("pause_reading")

    def resume_reading(self) -> None:
        self.events.append("resume_reading")


class _Other:
    """Stands for another connection's request in the server's task set."""


async def _whole(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})


def _connect(app: Any, others_in_flight: int = 1) -> tuple[HttpProtocol, Socket]:
    """A connection of a server with `others_in_flight` requests of other connections in flight (their tasks)."""
    config = uvicorn.Config(app, http=HttpProtocol, ws="none", lifespan="off", log_level="warning")
    config.load()
    state = ServerState()
    state.tasks.update(_Other() for _ in range(others_in_flight))  # type: ignore[misc]
    protocol = HttpProtocol(config=config, server_state=state, app_state={})
    sock = Socket()
    protocol.connection_made(sock)  # type: ignore[arg-type]
    return protocol, sock


async def _settle(protocol: HttpProtocol) -> None:
    for _ in range(50):  # bounded: the app's task and the loop's turns it takes
        await asyncio.sleep(0)
    mine = [t for t in protocol.tasks if isinstance(t, asyncio.Task)]
    if mine:
        await asyncio.wait_for(asyncio.gather(*mine), 5)
    for _ in range(5):
        await asyncio.sleep(0)


async def test_under_load_a_whole_answer_reaches_the_socket_in_one_write() -> None:
    protocol, sock = _connect(_whole)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle(protocol)
    assert len(sock.writes) == 1  # uvicorn's two writes, status line and headers then the body, joined
    assert sock.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert sock.writes[0].endswith(b"\r\n\r\nhello")
    protocol.connection_lost(None)


async def test_under_load_the_writes_wait_for_the_end_of_the_turn() -> None:
    seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _whole(scope, receive, send)
        seen.append(len(sock.writes))

    protocol, sock = _connect(app)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle(protocol)
    assert seen == [0]  # not yet when the app's step ends ...
    assert len(sock.writes) == 1  # ... and all of it once the turn is over
    protocol.connection_lost(None)


async def test_a_request_alone_is_written_at_once_as_uvicorn_would() -> None:
    """With no other request in flight nothing waits: what the app sends is on the socket when `send` returns."""
    seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        seen.append(len(sock.writes))
        await send({"type": "http.response.body", "body": b"hello"})
        seen.append(len(sock.writes))

    protocol, sock = _connect(app, others_in_flight=0)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle(protocol)
    assert seen == [1, 2]
    assert sock.writes[0].startswith(b"HTTP/1.1 200 OK") and sock.writes[1] == b"hello"
    protocol.connection_lost(None)


async def test_keep_alive_answers_stay_in_order() -> None:
    protocol, sock = _connect(_whole)
    protocol.data_received(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle(protocol)
    protocol.data_received(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle(protocol)
    assert len(sock.writes) == 2
    assert all(w.startswith(b"HTTP/1.1 200 OK") and w.endswith(b"hello") for w in sock.writes)
    protocol.connection_lost(None)


async def test_a_close_sends_what_was_written_first() -> None:
    protocol, sock = _connect(_whole)
    protocol.data_received(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")  # no keep-alive: uvicorn closes after the answer
    await _settle(protocol)
    assert sock.events[-2:] == ["write", "close"]
    assert sock.writes[0].endswith(b"hello")
    protocol.connection_lost(None)


async def test_a_bad_request_gets_its_400_before_the_close() -> None:
    protocol, sock = _connect(_whole)
    protocol.data_received(b"NOT HTTP\r\n\r\n")
    await _settle(protocol)
    assert sock.writes and sock.writes[0].startswith(b"HTTP/1.1 400 ")
    assert sock.events[-1] == "close"


async def test_a_stream_leaves_event_by_event() -> None:
    """A stream's events are not held back for the next one: each turn's writes leave at the end of that turn."""
    seen: list[int] = []
    protocol: HttpProtocol
    sock: Socket

    async def stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
            await asyncio.sleep(0.01)  # the next upstream event is not here yet
            seen.append(len(sock.writes))
        await send({"type": "http.response.body", "body": b""})

    protocol, sock = _connect(stream)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle(protocol)
    assert seen == [1, 2, 3]  # the head and the first event together, then one write an event
    assert b"data: 2" in sock.writes[2]
    assert sock.writes[-1] == b"0\r\n\r\n"
    protocol.connection_lost(None)


async def test_nothing_is_written_for_a_client_that_left() -> None:
    loop = asyncio.get_running_loop()
    sock = Socket()
    joined = JoinedWrites(sock, loop, {1, 2})  # type: ignore[arg-type]
    joined.write(b"HTTP/1.1 200 OK\r\n\r\n")
    sock.closing = True  # the client went away in this turn
    await asyncio.sleep(0)
    assert sock.writes == []
    assert joined.is_closing()
    assert joined.get_extra_info("peername") == ("127.0.0.1", 50000)  # the rest is the socket's own
