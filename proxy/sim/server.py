"""Run the simulated upstream in a daemon thread with its own event loop, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Any

from aiohttp import web

from .app import create_sim_app
from .simulator import Simulator

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


class SimServer:
    """`with SimServer(sim) as server:` serves `sim` at `server.base_url` until the block ends.

    It counts the sockets in `sim.open_connections`. At stop, silences are released (hangs close their
    connection); requests still open get `shutdown_timeout` seconds before they are cancelled.
    """

    def __init__(
        self,
        sim: Simulator | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        shutdown_timeout: float = 0.5,
        backlog: int = 4096,
    ) -> None:
        self.sim = sim or Simulator()
        self.host, self.port = host, port
        self._shutdown_timeout, self._backlog = shutdown_timeout, backlog
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> SimServer:
        """Start serving; returns once the port is bound (raises if it cannot be)."""
        if self._thread is not None:
            raise RuntimeError("SimServer already started")
        self._thread = threading.Thread(target=self._run, name="flex-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError(f"simulator did not start within {_START_TIMEOUT_S}s")
        if self._error is not None:
            self._thread.join(_STOP_TIMEOUT_S)
            raise self._error
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread; safe to call twice."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        self.sim.release_hangs()
        if loop is not None and stopping is not None and not loop.is_closed():
            # The loop may close between the check and the call; the thread is ending then anyway.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                raise RuntimeError(f"simulator thread did not stop within {_STOP_TIMEOUT_S}s")

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # handed to start(), which re-raises it
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        runner = web.AppRunner(
            create_sim_app(self.sim),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        _count_connections(runner.server, self.sim)
        try:
            site = web.TCPSite(runner, self.host, self.port, backlog=self._backlog)
            await site.start()
            self.port = runner.addresses[0][1]
            self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()


def _count_connections(server: web.Server | None, sim: Simulator) -> None:
    """Report each socket the server opens and loses to `sim`.

    aiohttp's protocol calls `connection_made` and `connection_lost` on its `web.Server` exactly once per
    socket; its `connections` list, by contrast, keeps a lost connection until its handler ends.
    """
    if server is None:
        raise RuntimeError("the runner has no server after setup")
    made, lost = server.connection_made, server.connection_lost

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        sim.connection_made()
        made(handler, transport)

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        sim.connection_lost()
        lost(handler, exc)

    # Instance attributes shadow the methods for this one server; aiohttp looks them up on each call.
    setattr(server, "connection_made", connection_made)  # noqa: B010
    setattr(server, "connection_lost", connection_lost)  # noqa: B010
