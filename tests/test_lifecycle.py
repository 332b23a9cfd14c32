"""Concurrency, client disconnects and SIGTERM: the proxy under load and under stop, on real sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest
from conftest import ProxyServer

from proxy.sim import Reply, SimServer, Simulator

MESSAGES = [{"role": "user", "content": "hi"}]


def wait_until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


async def test_400_concurrent_slow_requests_all_succeed(proxy: ProxyServer, sim: Simulator) -> None:
    sim.options = replace(sim.options, latency_flex_s=3.0)
    client = proxy.async_client(timeout=60)
    start = time.monotonic()
    answers = await asyncio.gather(
        *(client.chat.completions.create(model="o3", messages=MESSAGES) for _ in range(400))  # type: ignore[arg-type]
    )
    elapsed = time.monotonic() - start
    await client.close()
    assert all(a.service_tier == "flex" for a in answers)
    assert len({a.id for a in answers}) == 400
    # Held together, not queued behind a small pool: 400 x 3 s would take 20 minutes one by one.
    assert elapsed < 30, elapsed
    assert proxy.metric("flexproxy_requests_total", outcome="ok") == 400


def give_up_after(proxy: ProxyServer, seconds: float) -> None:
    """A client that hangs up without saying its deadline (the SDK would send x-stainless-read-timeout)."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            proxy.base_url + "/chat/completions",
            json={"model": "o3", "messages": MESSAGES},
            headers={"authorization": "Bearer k"},
            timeout=seconds,
        )


def test_client_disconnect_stops_the_upstream_wait(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(kind="hang", delay_s=30))
    give_up_after(proxy, 1)
    assert wait_until(lambda: proxy.metric("flexproxy_requests_total", outcome="client_disconnected") == 1)
    assert proxy.metric("flexproxy_requests_in_flight") == 0
    assert len(sim.requests) == 1


def test_client_disconnect_during_backoff_stops_the_retries(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(backoff_initial_s=3, backoff_max_s=3, standard_reserve_s=0)
    sim.script(Reply(kind="flex_429", retry_after_s=3), Reply(kind="flex_429"), Reply(kind="flex_429"))
    give_up_after(proxy, 1)
    assert wait_until(lambda: proxy.metric("flexproxy_requests_total", outcome="client_disconnected") == 1)
    time.sleep(3.5)  # past the back-off: had the work gone on, the next attempt would have arrived by now
    assert len(sim.requests) == 1


def test_client_disconnect_mid_stream_closes_it(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(kind="ok", events=50, event_interval_s=0.2))
    stream = proxy.client().chat.completions.create(model="o3", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    next(iter(stream))
    stream.close()
    assert wait_until(lambda: proxy.metric("flexproxy_requests_total", outcome="client_disconnected") == 1)
    assert proxy.metric("flexproxy_requests_in_flight") == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_lets_in_flight_requests_finish(sim_server: SimServer, sim: Simulator, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}
    env |= {"FLEX_PROXY_UPSTREAM_BASE_URL": sim_server.base_url, "FLEX_PROXY_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--shutdown-grace-s", "10", "--drain-delay-s", "0"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _healthy(url)), "proxy did not start"
        sim.script(Reply(kind="slow", delay_s=3.0))
        result: dict[str, object] = {}

        def call() -> None:
            with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as client:
                result["answer"] = client.chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]

        thread = threading.Thread(target=call)
        thread.start()
        assert wait_until(lambda: len(sim.requests) == 1)
        process.send_signal(signal.SIGTERM)
        # While the request is still being answered, the listening socket is already closed.
        assert wait_until(lambda: not _accepts(port), timeout=2.0)
        assert thread.is_alive()
        thread.join(15)
        assert result["answer"].service_tier == "flex"  # type: ignore[attr-defined]
        # uvicorn re-raises the SIGTERM it caught once drained, so the exit status is the usual 143 (-15 here).
        assert process.wait(15) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz")
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "Traceback" not in output


def _start(sim_server: SimServer, tmp_path, *args: str) -> tuple[subprocess.Popen[str], int]:  # type: ignore[no-untyped-def]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}
    env |= {"FLEX_PROXY_UPSTREAM_BASE_URL": sim_server.base_url, "FLEX_PROXY_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", *args],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    if not wait_until(lambda: _healthy(f"http://127.0.0.1:{port}")):
        process.kill()
        raise AssertionError("proxy did not start:\n" + process.communicate()[0])
    return process, port


def _readyz(url: str) -> int | None:
    """/readyz's status, or None when no connection can be made."""
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code
    except httpx.ConnectError:
        return None


def test_sigterm_answers_readyz_503_on_an_open_listener_for_the_drain_delay_then_exits(
    sim_server: SimServer, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    """A load balancer polling /readyz must see 503 before connections are refused (FLEX_PROXY_DRAIN_DELAY_S)."""
    process, port = _start(sim_server, tmp_path, "--drain-delay-s", "2", "--shutdown-grace-s", "10")
    url = f"http://127.0.0.1:{port}"
    try:
        assert _readyz(url) == 200
        process.send_signal(signal.SIGTERM)
        seen: list[int | None] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and process.poll() is None:  # every answer until the listener goes
            seen.append(_readyz(url))
            if seen[-1] is None:
                break
            time.sleep(0.1)
        answered = [status for status in seen if status is not None]
        # Still accepting after SIGTERM, every answer a 503, then refused: the order a load balancer needs.
        assert len(answered) >= 5 and set(answered[1:]) == {503}, seen
        assert seen[-1] is None or process.poll() is not None, seen
        assert process.wait(15) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "flex-proxy draining" in output and "listener_closes_in_s=2" in output, output
    assert "Traceback" not in output


def test_ctrl_c_skips_the_drain_delay(sim_server: SimServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """At a terminal nobody polls /readyz: SIGINT closes the listener at once, whatever the delay."""
    process, port = _start(sim_server, tmp_path, "--drain-delay-s", "60")
    try:
        process.send_signal(signal.SIGINT)
        assert wait_until(lambda: not _accepts(port), timeout=5.0)
        assert process.wait(15) == 130  # the shell's status for Ctrl-C, without a traceback
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "flex-proxy draining" not in output and "Traceback" not in output, output


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- the drain runs out: an OpenAI-shaped answer, never uvicorn's plain-text 500 -------------------------------


class Draining:
    """The real `flex-proxy` with a 1 s drain, in front of the simulator; `stop()` sends SIGTERM and returns all
    the process wrote."""

    def __init__(self, sim_server: SimServer, cwd: object) -> None:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}
        env |= {
            "FLEX_PROXY_UPSTREAM_BASE_URL": sim_server.base_url, "FLEX_PROXY_PORT": str(port),
            "FLEX_PROXY_SHUTDOWN_GRACE_S": "1",
        }  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy"], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _healthy(self.url)), "proxy did not start"

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.communicate()[0]


def _in_thread(call) -> tuple[threading.Thread, dict[str, object]]:  # type: ignore[no-untyped-def]
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["answer"] = call()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize(
    ("reply", "retry"),
    [(Reply(kind="slow", delay_s=20), "false"), (Reply(kind="rate_limit_429", retry_after_ms=20_000), "true")],
    ids=["attempt-in-flight", "waiting-between-attempts"],
)
def test_the_drain_running_out_answers_503_in_openai_shape(
    sim_server: SimServer, sim: Simulator, tmp_path, reply: Reply, retry: str  # type: ignore[no-untyped-def]
) -> None:
    proxy = Draining(sim_server, tmp_path)
    output = ""
    try:
        sim.script(reply)
        # The SDK's default retries: a 503 marked final must not be re-sent; one marked retry may go elsewhere.
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=2 if retry == "false" else 0)
        thread, outcome = _in_thread(lambda: client.chat.completions.create(model="o3", messages=MESSAGES))  # type: ignore[arg-type]
        assert wait_until(lambda: len(sim.requests) == 1)
        time.sleep(0.2)  # the request is now past its first attempt: in flight, or sleeping through retry-after
        output = proxy.stop()
        thread.join(15)
    finally:
        output = output or proxy.stop()
        client.close()
    error = outcome.get("error")
    assert isinstance(error, openai.APIStatusError), (outcome, output)
    assert error.status_code == 503 and error.code == "proxy_shutting_down"
    body = error.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["type"] == "server_error"
    assert error.response.headers["x-should-retry"] == retry
    assert error.response.headers["content-type"] == "application/json"
    assert len(sim.requests) == 1  # upstream saw one attempt: the SDK did not re-send
    lines = [line for line in output.splitlines() if "outcome=" in line]
    assert len(lines) == 1 and "outcome=shutdown" in lines[0] and "status=503" in lines[0], output
    assert "Traceback" not in output


def test_the_drain_running_out_ends_a_stream_with_an_error_event(
    sim_server: SimServer, sim: Simulator, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    proxy = Draining(sim_server, tmp_path)
    output = ""
    received: list[object] = []
    try:
        sim.script(Reply(kind="ok", events=60, event_interval_s=0.5))
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k")

        def read_stream() -> None:
            for chunk in client.chat.completions.create(model="o3", messages=MESSAGES, stream=True):  # type: ignore[arg-type]
                received.append(chunk)

        thread, outcome = _in_thread(read_stream)
        assert wait_until(lambda: len(received) >= 1)
        output = proxy.stop()
        thread.join(15)
    finally:
        output = output or proxy.stop()
        client.close()
    error = outcome.get("error")
    assert isinstance(error, openai.APIError) and error.code == "proxy_shutting_down", (outcome, output)
    assert 1 <= len(received) < 60
    assert len(sim.requests) == 1
    lines = [line for line in output.splitlines() if "outcome=" in line]
    assert len(lines) == 1 and "outcome=shutdown" in lines[0] and "status=200" in lines[0], output
    assert "Traceback" not in output
