"""Keys: whose key goes upstream, client keys when the proxy holds one, and no key in any log."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ProxyServer

from proxy.sim import SimServer, Simulator

BODY = {"model": "o3", "messages": [{"role": "user", "content": "hi"}]}


def test_client_key_is_forwarded(proxy: ProxyServer, sim: Simulator) -> None:
    proxy.client(api_key="sk-theirs").chat.completions.create(**BODY)  # type: ignore[call-overload]
    assert sim.requests[-1].headers["authorization"] == "Bearer sk-theirs"


def test_proxy_key_fills_in_for_requests_without_one(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(api_key="sk-proxy")
    assert httpx.post(proxy.base_url + "/chat/completions", json=BODY).status_code == 200
    assert sim.requests[-1].headers["authorization"] == "Bearer sk-proxy"


def test_client_keys_gate_the_proxy_key(make_proxy, sim: Simulator, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(api_key="sk-proxy-secret", client_keys="team-a-secret,team-b-secret")
    with caplog.at_level(logging.DEBUG, logger="flex_proxy"):
        for key in ("wrong", "sk-proxy-secret"):
            with pytest.raises(openai.AuthenticationError) as caught:
                proxy.client(api_key=key).chat.completions.create(**BODY)  # type: ignore[call-overload]
            assert caught.value.code == "invalid_api_key"
        missing = httpx.post(proxy.base_url + "/models", json=BODY)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
        assert sim.requests == []
        proxy.client(api_key="team-b-secret").chat.completions.create(**BODY)  # type: ignore[call-overload]
    assert sim.requests[-1].headers["authorization"] == "Bearer sk-proxy-secret"
    assert "secret" not in caplog.text
    assert "secret" not in proxy.metrics()


def test_refuses_to_be_an_open_relay(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}
    env |= {"FLEX_PROXY_API_KEY": "sk-proxy-secret", "FLEX_PROXY_HOST": "0.0.0.0"}
    result = subprocess.run(
        [sys.executable, "-m", "proxy"], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "FLEX_PROXY_CLIENT_KEYS" in lines[0]
    assert "sk-proxy-secret" not in result.stderr


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"FLEX_PROXY_PORT": "eighty"}, "FLEX_PROXY_PORT"),
        ({"FLEX_PROXY_ON_UNAVAILABLE": "pray"}, "FLEX_PROXY_ON_UNAVAILABLE"),
        ({"FLEX_PROXY_UPSTREAM_BASE_URL": "ftp://x"}, "FLEX_PROXY_UPSTREAM_BASE_URL"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line(tmp_path, env: dict[str, str], name: str) -> None:  # type: ignore[no-untyped-def]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy"], env=clean | env, capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"flex-proxy: invalid setting {name}")


# -- client keys: a bare key, or `name key` (never split at a `=` of the key) ------------------------------------

BASE64_KEY = "q3MxXn0RzUQjYl7kP9aWbQ=="  # `openssl rand -base64 16`: ends in `=`
NAMED_KEY = "q3Mx+/ab=="
OLD_FORM = "web=ck-old-form-q3Mx"
KEY_TEXT = ("q3Mx", "ck-old-form", "sk-proxy-secret")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(check, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_keys_with_equals_plus_and_slash_work_and_are_never_shown(
    sim_server: SimServer, sim: Simulator, tmp_path: Path
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}
    env |= {
        "FLEX_PROXY_UPSTREAM_BASE_URL": sim_server.base_url, "FLEX_PROXY_PORT": str(port),
        "FLEX_PROXY_DRAIN_DELAY_S": "0",  # stopped with SIGTERM; nothing polls /readyz
        "FLEX_PROXY_API_KEY": "sk-proxy-secret", "FLEX_PROXY_CLIENT_KEYS": f"{BASE64_KEY},team {NAMED_KEY},{OLD_FORM}",
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait(lambda: _up(url)), "proxy did not start"
        for key in (BASE64_KEY, NAMED_KEY, OLD_FORM):
            with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
                assert client.chat.completions.create(**BODY).service_tier == "flex"  # type: ignore[call-overload]
            assert sim.requests[-1].headers["authorization"] == "Bearer sk-proxy-secret"
        # What splitting at the first `=` made of these: the key's tail, and the name it read from the key.
        for key in ("=", "q3MxXn0RzUQjYl7kP9aWbQ", "ck-old-form-q3Mx", "team", f"team {NAMED_KEY}"):
            answer = httpx.post(url + "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"})
            assert answer.status_code == 401, key
        assert len(sim.requests) == 3
        metrics = httpx.get(url + "/metrics").text
        assert 'client="team"' in metrics and 'client="default"' in metrics
        assert not [text for text in KEY_TEXT if text in metrics]
        status = httpx.get(url + "/flex/policies").text + httpx.get(url + "/flex/status").text
        assert not [text for text in KEY_TEXT if text in status]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output = process.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
    # One warning for the old `name=key` entry, naming where it is and never what it holds.
    warnings = [line for line in output.splitlines() if "name=key" in line]
    assert len(warnings) == 1 and "FLEX_PROXY_CLIENT_KEYS entry 3" in warnings[0], output
    assert "`name key`" in warnings[0]
    assert not [text for text in KEY_TEXT if text in output], output


@pytest.mark.parametrize(
    ("entries", "where"),
    [
        (f"bad/name+ {NAMED_KEY}", "FLEX_PROXY_CLIENT_KEYS entry 1"),
        (f"{BASE64_KEY},team q3Mx {NAMED_KEY}", "FLEX_PROXY_CLIENT_KEYS entry 2"),
        (f"{BASE64_KEY},ck-1,{BASE64_KEY}", "twice"),
    ],
)
def test_a_bad_client_key_stops_start_up_without_showing_it(tmp_path: Path, entries: str, where: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}
    env = clean | {"FLEX_PROXY_API_KEY": "sk-proxy-secret", "FLEX_PROXY_CLIENT_KEYS": entries}
    result = subprocess.run(
        [sys.executable, "-m", "proxy"], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and where in result.stderr, result.stderr
    assert not [text for text in (*KEY_TEXT, "bad/name", "team") if text in result.stderr], result.stderr
