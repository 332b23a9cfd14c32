"""A priced stream ends with its cost as an SSE comment, which the official SDK skips; streams without a price, or
cut short, end without one."""

from __future__ import annotations

import re
from typing import Any

import httpx
import openai
import pytest
from conftest import ProxyServer
from traffic import O3_FLEX_NUSD, USAGE, nano_by

from proxy.sim import Reply, Simulator

MESSAGES = [{"role": "user", "content": "hi"}]
COMMENT = re.compile(rb"\n\n: x-flex-cost-usd=(\d+\.\d{8}) x-flex-saved-usd=(-?\d+\.\d{8})\n\n$")


def raw_stream(proxy: ProxyServer, path: str, body: dict[str, Any]) -> bytes:
    with httpx.stream(
        "POST", proxy.base_url + path, json=body, headers={"authorization": "Bearer sk-client"}, timeout=30
    ) as answer:
        assert answer.status_code == 200
        assert "x-flex-cost-usd" not in answer.headers  # the headers left before the usage came
        return answer.read()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"model": "o3", "messages": MESSAGES, "stream": True}),
        ("/chat/completions", {"model": "o3", "messages": MESSAGES, "stream": True,
                               "stream_options": {"include_usage": True}}),
        ("/responses", {"model": "o3", "input": "hi", "stream": True}),
    ],
    ids=["chat", "chat-with-usage", "responses"],
)  # fmt: skip
def test_a_priced_stream_ends_with_its_cost(proxy: ProxyServer, sim: Simulator, path: str, body: dict[str, Any]) -> None:  # noqa: E501
    sim.script(Reply(usage=USAGE))
    data = raw_stream(proxy, path, body)
    found = COMMENT.search(data)
    assert found is not None, data[-300:]
    assert found.groups() == (b"0.00350200", b"0.00350200")  # o3 on flex: $0.003502, and as much saved
    assert nano_by(proxy.metrics(), "flexproxy_cost_usd_total")[""] == O3_FLEX_NUSD


def test_the_sdk_reads_a_stream_that_ends_with_the_cost_comment(proxy: ProxyServer, sim: Simulator) -> None:
    client = proxy.client()
    sim.script(Reply(usage=USAGE))
    chunks = list(client.chat.completions.create(model="o3", messages=MESSAGES, stream=True))  # type: ignore[call-overload]
    assert chunks and chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)  # the usage the proxy asked for is still taken out
    sim.script(Reply(usage=USAGE))
    events = list(client.responses.create(model="o3", input="hi", stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.usage.input_tokens == 1_234
    sim.script(Reply(usage=USAGE))
    with client.chat.completions.stream(model="o3", messages=MESSAGES) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    assert final.choices[0].message.content


def test_no_comment_without_a_price_or_after_a_cut(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(usage=USAGE))
    unpriced = raw_stream(proxy, "/chat/completions", {"model": "gpt-sim-9", "messages": MESSAGES, "stream": True})
    assert b"x-flex-cost-usd" not in unpriced and unpriced.endswith(b"data: [DONE]\n\n")
    untouched = {"model": "o3", "messages": MESSAGES, "stream": True}
    with httpx.stream(
        "POST", proxy.base_url + "/chat/completions", json=untouched, timeout=30,
        headers={"authorization": "Bearer sk-client", "x-flex-tier": "off"},
    ) as answer:  # fmt: skip
        assert b"x-flex-cost-usd" not in answer.read()  # sent as it came: no usage asked for, so no price
    sim.script(Reply("cut_stream", events=3))
    with pytest.raises(openai.APIError):
        list(proxy.client().chat.completions.create(model="o3", messages=MESSAGES, stream=True))  # type: ignore[call-overload]
    sim.script(Reply("cut_stream", events=3))
    cut = raw_stream(proxy, "/chat/completions", {"model": "o3", "messages": MESSAGES, "stream": True})
    assert b"x-flex-cost-usd" not in cut and b"upstream" in cut
