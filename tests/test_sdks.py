"""Each official SDK as the client, with its own deadline header: the Node SDK (tests/node, run by `node`) sends
X-Stainless-Timeout, the Python SDK x-stainless-read-timeout. The proxy must answer before either gives up, so the
SDK's own re-sends never ask upstream to do the work again."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
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


@needs_node
@pytest.mark.parametrize(
    "call",
    [{"requestTimeout": 5000}, {"timeout": 5000, "defaultHeaders": {"X-Flex-Deadline-S": "5"}}],
    ids=["call-timeout", "client-timeout-with-deadline-header"],
)
def test_node_sdk_timeout_gets_the_proxys_504_and_upstream_works_once(
    proxy: ProxyServer, sim: Simulator, call: dict[str, Any]
) -> None:
    sim.options = replace(sim.options, latency_flex_s=FLEX_ANSWER_S)
    result = node_call(baseURL=proxy.base_url, apiKey="sk-node", **call)  # the SDK's default retries: 2
    # The proxy's own final 504, before the SDK's 5 s, which the SDK does not re-send.
    assert result["ok"] is False and result["status"] == 504, result
    assert result["code"] == "deadline_exceeded"
    assert result["headers"]["x-should-retry"] == "false"
    assert result["elapsed_ms"] < 5000
    if "requestTimeout" in call:
        assert sim.requests[0].headers["x-stainless-timeout"] == "5"
    no_more_requests(sim, 1, within=1.0)
    assert proxy.metric("flexproxy_requests_total", outcome="client_deadline") == 1


def test_python_sdk_timeout_gets_the_proxys_504_and_upstream_works_once(proxy: ProxyServer, sim: Simulator) -> None:
    sim.options = replace(sim.options, latency_flex_s=FLEX_ANSWER_S)
    client = proxy.client(timeout=5, max_retries=openai.DEFAULT_MAX_RETRIES)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="o3", messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 5
    assert caught.value.status_code == 504 and caught.value.code == "deadline_exceeded"
    assert caught.value.response.headers["x-should-retry"] == "false"
    no_more_requests(sim, 1, within=1.0)


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
