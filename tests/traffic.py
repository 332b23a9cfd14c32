"""Mixed model traffic for the savings tests, through the official SDK: two named clients, flex answers, a fallback to
standard, a Responses stream, a model without flex, a cut stream (an unread answer) and a refused key; and /metrics
read back as exact nano-USD."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import openai
import pytest
from conftest import ProxyServer

from proxy.sim import Reply, Simulator

# The proxy's own flex retries run out after two 429s, then it falls back; no gate, so the script is the whole story.
SETTINGS: dict[str, Any] = {
    "api_key": "sk-proxy-upstream", "client_keys": "web ck-web-123,batch ck-batch-456", "flex_gate": False,
    "max_flex_attempts": 2,
}  # fmt: skip
MESSAGES = [{"role": "user", "content": "hi"}]
# o3 per 1M tokens: standard $2 input / $8 output, flex half. 1,234 in and 567 out: flex $0.003502, standard $0.007004.
USAGE = {"input": 1_234, "output": 567}
O3_FLEX_NUSD, O3_STANDARD_NUSD = 3_502_000, 7_004_000


def send(proxy: ProxyServer, sim: Simulator) -> None:
    web = proxy.client(api_key="ck-web-123", timeout=30)
    batch = proxy.client(api_key="ck-batch-456", timeout=30)
    for _ in range(3):
        sim.script(Reply(usage=USAGE))
        assert web.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "flex"  # type: ignore[arg-type]
    sim.script(Reply(kind="flex_429"), Reply(kind="flex_429"), Reply(usage=USAGE))
    assert web.chat.completions.create(model="o3", messages=MESSAGES).service_tier != "flex"  # type: ignore[arg-type]
    events = list(batch.responses.create(model="gpt-5-mini", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    batch.chat.completions.create(model="gpt-4.1", messages=MESSAGES)  # type: ignore[arg-type]  # no flex tier
    sim.script(Reply("cut_stream", events=3))
    with pytest.raises(openai.APIError):
        list(web.chat.completions.create(model="o3", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key="ck-wrong").chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            found.append((match.group(1), labels, float(match.group(3))))
    return found


def nano_by(text: str, name: str, label: str | None = None) -> dict[str, int]:
    """A money counter's samples in whole nano-USD, summed by one label (or all under "")."""
    out: dict[str, int] = defaultdict(int)
    for metric, labels, value in samples(text):
        if metric == name:
            nano = round(value * 1e9)
            assert abs(nano - value * 1e9) < 1e-3 * max(1.0, value * 1e9), (name, value)  # whole nano-USD shown
            out[labels.get(label, "") if label else ""] += nano
    return dict(out)


def count(text: str, name: str, **match: str) -> float:
    return sum(v for m, labels, v in samples(text) if m == name and all(labels.get(k) == x for k, x in match.items()))
