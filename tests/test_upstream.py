"""proxy.upstream on real sockets: TCP keepalive on every upstream connection, read off the live socket."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from conftest import ProxyServer
from rawup import RawRequest, RawUpstream, response

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds the proxy's socket through /proc/self/fd (Linux only)"
)
BODY = {"model": "o3", "messages": [{"role": "user", "content": "hi"}]}
KEEPALIVE = {"tcp_keepalive_idle_s": 7, "tcp_keepalive_interval_s": 3, "tcp_keepalive_count": 5}


class HeldUpstream:
    """A raw upstream that holds each request unanswered until `release` is set, as flex does for minutes."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.peers: list[tuple[str, int]] = []  # the proxy's end of each connection, as upstream sees it
        self.raw = RawUpstream(self._answer)

    async def _answer(self, request: RawRequest, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername"))
        for _ in range(200):  # at most 10 s
            if self.release.is_set():
                break
            await asyncio.sleep(0.05)
        writer.write(response(200, [(b"content-type", b"application/json")], b'{"object": "list", "data": []}'))


@pytest.fixture
def held() -> Iterator[HeldUpstream]:
    upstream = HeldUpstream()
    with upstream.raw:
        yield upstream
    upstream.release.set()


def own_socket_to(local_port: int, remote_port: int) -> socket.socket | None:
    """This process's TCP socket from `local_port` to 127.0.0.1:`remote_port` (a duplicate: closing it is safe)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))  # family and type read off the descriptor
        except OSError:
            continue
        try:
            if (
                sock.family == socket.AF_INET
                and sock.getsockname()[1] == local_port
                and sock.getpeername() == ("127.0.0.1", remote_port)
            ):
                return sock
        except OSError:
            pass
        sock.close()
    return None


@pytest.mark.parametrize(
    ("method", "path", "body"), [("POST", "/chat/completions", BODY), ("GET", "/models", None)],
    ids=["model-request", "pass-through"],
)  # fmt: skip
@pytest.mark.parametrize("settings", [KEEPALIVE, {}], ids=["set", "defaults"])
def test_every_upstream_socket_has_tcp_keepalive(
    make_proxy: Callable[..., ProxyServer], held: HeldUpstream, method: str, path: str, body: object,
    settings: dict[str, int],
) -> None:  # fmt: skip
    proxy = make_proxy(upstream_base_url=held.raw.url + "/v1", **settings)
    answers: list[httpx.Response] = []
    caller = threading.Thread(
        target=lambda: answers.append(httpx.request(method, proxy.base_url + path, json=body, timeout=20))
    )
    caller.start()
    try:
        deadline = time.monotonic() + 10
        while not held.peers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held.peers, "the request did not reach upstream"
        sock = own_socket_to(held.peers[0][1], held.raw.port)
        assert sock is not None, "no socket of the proxy is connected to upstream"
        with sock:
            options = (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            )
    finally:
        held.release.set()
        caller.join(20)
    expected = KEEPALIVE if settings else {"idle": 60, "interval": 15, "count": 4}
    assert options == (1, *expected.values())
    assert answers and answers[0].status_code == 200
