"""Keys: whose key goes upstream, client keys when the proxy holds one, and no key in any log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import httpx
import openai
import pytest
from conftest import ProxyServer

from proxy.sim import Simulator

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
