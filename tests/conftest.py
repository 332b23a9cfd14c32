"""Real servers on 127.0.0.1: the simulated upstream (proxy.sim) and the proxy under uvicorn."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from redis_server import RedisServer

from proxy.app import create_app
from proxy.config import Settings
from proxy.sim import SimOptions, SimServer, Simulator


class ProxyServer:
    """The proxy app under a real uvicorn server in a thread, on a free loopback port."""

    def __init__(self, settings: Settings, **seams: Any) -> None:
        self.app = create_app(settings, **seams)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on",
            timeout_graceful_shutdown=5,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.clients: list[openai.OpenAI] = []

    def start(self) -> ProxyServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("proxy did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", "sk-client")
        kwargs.setdefault("max_retries", 0)
        client = openai.OpenAI(base_url=self.base_url, **kwargs)
        self.clients.append(client)  # closed at stop, so no socket outlives its test
        return client

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", "sk-client")
        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, **kwargs)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of every sample of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            match = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
            if not match or match.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match.group(3))
        return total


@pytest.fixture(scope="session")
def sim_server() -> Iterator[SimServer]:
    with SimServer(Simulator(SimOptions())) as server:
        yield server


@pytest.fixture
def sim(sim_server: SimServer) -> Iterator[Simulator]:
    simulator = sim_server.sim
    simulator.reset()
    simulator.options = SimOptions()
    yield simulator
    simulator.reset()


@pytest.fixture
def make_proxy(sim_server: SimServer) -> Iterator[Callable[..., ProxyServer]]:
    started: list[ProxyServer] = []

    def make(*, rand: Callable[[], float] | None = None, **overrides: Any) -> ProxyServer:
        values: dict[str, Any] = {
            "upstream_base_url": sim_server.base_url,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.05,
            "min_backoff_s": 0.005,
            "gate_probe_initial_s": 0.01,
            "gate_probe_max_s": 0.05,
        }
        values.update(overrides)
        server = ProxyServer(Settings(**values), **({"rand": rand} if rand else {})).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def proxy(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> ProxyServer:
    return make_proxy()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh Redis (no password) on a free loopback port; killed at the end."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs(*tools): skip, naming the tool and how to install it, when one of these programs is missing"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    from tools import need

    for marker in item.iter_markers("needs"):
        for name in marker.args:
            need(name)
