"""Each official SDK as the client, with its own deadline header: the Node SDK (tests/node, run by `node`) sends
X-Stainless-Timeout, the Python SDK x-stainless-read-timeout. The proxy must answer before either gives up, so the
SDK's own re-sends never ask upstream to do the work again."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import ProxyServer

from proxy.sim import Simulator

NODE_DIR = Path(__file__).parent / "node"
NODE = shutil.which("node")
NODE_SDK = NODE_DIR / "node_modules" / "openai" / "package.json"
needs_node = pytest.mark.skipif(
    NODE is None or not NODE_SDK.is_file(),
    reason="the Node SDK tests need node and the SDK: `npm ci --prefix tests/node` (node "
    + ("missing" if NODE is None else "found, tests/node/node_modules missing")
    + ")",
)
FLEX_ANSWER_S = 15.0  # much longer than the clients wait


def node_call(timeout_s: float = 60, **call: Any) -> dict[str, Any]:
    """Run tests/node/client.mjs for one call; its one JSON line, parsed."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(NODE_DIR / "client.mjs"), json.dumps(call)], capture_output=True, text=True, timeout=timeout_s,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def no_more_requests(sim: Simulator, count: int, within: float) -> None:
    """Bounded proof of absence: upstream sees no request beyond `count` for `within` seconds."""
    assert not sim.wait_for(lambda: len(sim.requests) > count, timeout=within), len(sim.requests)
    assert len(sim.requests) == count


def answered_in_time(proxy: ProxyServer, sim: Simulator, short_reserve: bool, result: dict[str, Any]) -> None:
    """What a client with a 5 s deadline gets while flex takes 15 s, once the proxy knows that deadline: at the
    defaults the deadline leaves no room for flex beside the standard reserve, so the request goes to standard at
    once; with a short reserve it waits for flex and gets the proxy's final 504 just before the deadline. Either
    way before the SDK's own timeout, so the SDK re-sends nothing and upstream works once."""
    assert result["elapsed_ms"] < 5000, result
    if short_reserve:
        assert result["ok"] is False and result["status"] == 504, result
        assert result["code"] == "deadline_exceeded"
        assert result["headers"]["x-should-retry"] == "false"
        assert proxy.metric("flexproxy_requests_total", outcome="client_deadline") == 1
    else:
        assert result["ok"] is True and result["status"] == 200, result
        assert result["headers"]["x-flex-served-tier"] == "default"
    no_more_requests(sim, 1, within=1.0)


RESERVES = pytest.mark.parametrize("short_reserve", [False, True], ids=["defaults", "short-reserve"])


@needs_node
@RESERVES
@pytest.mark.parametrize(
    "call",
    [{"requestTimeout": 5000}, {"timeout": 5000, "defaultHeaders": {"X-Flex-Deadline-S": "5"}}],
    ids=["call-timeout", "client-timeout-with-deadline-header"],
)
def test_node_sdk_timeout_is_answered_in_time_and_upstream_works_once(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, call: dict[str, Any], short_reserve: bool
) -> None:
    proxy = make_proxy(**({"standard_reserve_s": 1} if short_reserve else {}))
    sim.options = replace(sim.options, latency_flex_s=FLEX_ANSWER_S)
    result = node_call(baseURL=proxy.base_url, apiKey="sk-node", **call)  # the SDK's default retries: 2
    answered_in_time(proxy, sim, short_reserve, result)
    if "requestTimeout" in call:
        assert sim.requests[0].headers["x-stainless-timeout"] == "5"


@RESERVES
def test_python_sdk_timeout_is_answered_in_time_and_upstream_works_once(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, short_reserve: bool
) -> None:
    proxy = make_proxy(**({"standard_reserve_s": 1} if short_reserve else {}))
    sim.options = replace(sim.options, latency_flex_s=FLEX_ANSWER_S)
    client = proxy.client(timeout=5, max_retries=openai.DEFAULT_MAX_RETRIES)
    started = time.monotonic()
    result: dict[str, Any]
    try:
        raw = client.chat.completions.with_raw_response.create(model="o3", messages=[{"role": "user", "content": "hi"}])
        result = {"ok": True, "status": raw.http_response.status_code, "headers": dict(raw.headers)}
    except openai.APIStatusError as exc:
        result = {"ok": False, "status": exc.status_code, "code": exc.code, "headers": dict(exc.response.headers)}
    result["elapsed_ms"] = (time.monotonic() - started) * 1000
    answered_in_time(proxy, sim, short_reserve, result)
    assert sim.requests[0].headers["x-stainless-read-timeout"] == "5"


@needs_node
def test_node_sdk_is_served_on_flex(proxy: ProxyServer, sim: Simulator) -> None:
    result = node_call(baseURL=proxy.base_url, apiKey="sk-node")
    assert result["ok"] is True and result["status"] == 200, result
    assert result["body"]["service_tier"] == "flex"
    headers = result["headers"]
    assert headers["x-flex-requested-tier"] == "flex" and headers["x-flex-served-tier"] == "flex"
    assert headers["x-flex-attempts"] == "1"
    assert float(headers["x-flex-saved-usd"]) > 0
    assert [r.tier for r in sim.requests] == ["flex"]
    # Since SDK 5.x only a call's own timeout is sent: the client's (10 minutes by default) is not.
    assert "x-stainless-timeout" not in sim.requests[0].headers


@needs_node
def test_node_sdk_stream(proxy: ProxyServer, sim: Simulator) -> None:
    result = node_call(baseURL=proxy.base_url, apiKey="sk-node", stream=True)
    assert result["ok"] is True and result["status"] == 200, result
    chunks = result["chunks"]
    assert len(chunks) >= 2
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert all(c.get("usage") is None for c in chunks)  # the usage the proxy asked for is taken out again
    assert result["headers"]["x-flex-requested-tier"] == "flex"
    assert [r.tier for r in sim.requests] == ["flex"]
