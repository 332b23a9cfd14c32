"""Cost, savings and the metrics behind them, read from /metrics after real requests through the SDK."""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import datetime

import httpx
import openai
import pytest
from conftest import ProxyServer
from prometheus_client import CollectorRegistry, generate_latest

from proxy.logs import JsonFormatter
from proxy.metrics import OUTCOMES, Metrics
from proxy.sim import Reply, Simulator

MESSAGES = [{"role": "user", "content": "hi"}]
# o3: standard $2.00 input / $0.50 cached / $8.00 output per 1M tokens; flex is half (OpenAI pricing page).
USAGE = {"input": 1_000_000, "cached": 200_000, "output": 500_000, "reasoning": 100_000}
STANDARD_COST = 0.8 * 2.00 + 0.2 * 0.50 + 0.5 * 8.00  # $5.70
FLEX_COST = STANDARD_COST / 2  # $2.85


def ask(proxy: ProxyServer, endpoint: str, stream: bool, model: str = "o3") -> None:
    client = proxy.client()
    if endpoint == "chat":
        result = client.chat.completions.create(model=model, messages=MESSAGES, stream=stream)  # type: ignore[call-overload]
    else:
        result = client.responses.create(model=model, input="hi", stream=stream)
    if stream:
        list(result)


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
def test_savings_are_exact_for_flex_answers(proxy: ProxyServer, sim: Simulator, endpoint: str, stream: bool) -> None:
    sim.script(Reply(usage=USAGE))
    ask(proxy, endpoint, stream)
    assert proxy.metric("flexproxy_cost_saved_usd_total", model="o3") == pytest.approx(STANDARD_COST - FLEX_COST)
    assert proxy.metric("flexproxy_cost_usd_total", model="o3", tier="flex") == pytest.approx(FLEX_COST)
    assert proxy.metric("flexproxy_tokens_total", model="o3", tier="flex", kind="input") == 1_000_000
    assert proxy.metric("flexproxy_tokens_total", model="o3", tier="flex", kind="cached_input") == 200_000
    assert proxy.metric("flexproxy_tokens_total", model="o3", tier="flex", kind="output") == 500_000
    assert proxy.metric("flexproxy_tokens_total", model="o3", tier="flex", kind="reasoning") == 100_000
    endpoint_label = "chat" if endpoint == "chat" else "responses"
    assert proxy.metric("flexproxy_requests_total", endpoint=endpoint_label, served_tier="flex", outcome="ok") == 1
    assert proxy.metric("flexproxy_requests_in_flight") == 0


def test_a_fallback_counts_the_savings_lost_and_429s_cost_nothing(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(max_flex_attempts=2, flex_gate=False)
    sim.script(Reply(kind="flex_429"), Reply(kind="flex_429"), Reply(usage=USAGE))
    ask(proxy, "chat", stream=False)
    assert proxy.metric("flexproxy_cost_usd_total", model="o3", tier="standard") == pytest.approx(STANDARD_COST)
    assert proxy.metric("flexproxy_cost_usd_total", tier="flex") == 0
    assert proxy.metric("flexproxy_savings_lost_usd_total", model="o3") == pytest.approx(STANDARD_COST - FLEX_COST)
    assert proxy.metric("flexproxy_cost_saved_usd_total") == 0
    assert proxy.metric("flexproxy_fallbacks_total", endpoint="chat", model="o3") == 1
    assert proxy.metric("flexproxy_upstream_attempts_total", tier="flex", status_class="429") == 2
    assert proxy.metric("flexproxy_upstream_attempts_total", tier="standard", status_class="2xx") == 1
    assert proxy.metric("flexproxy_requests_total", requested_tier="flex", served_tier="standard") == 1


def test_dated_snapshot_is_priced_as_its_family(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(usage=USAGE))
    ask(proxy, "chat", stream=False, model="o3-2025-04-16")
    assert proxy.metric("flexproxy_cost_saved_usd_total", model="o3") == pytest.approx(STANDARD_COST - FLEX_COST)


def test_unpriced_model_is_counted_in_tokens_and_flagged(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(usage=USAGE))
    ask(proxy, "chat", stream=False, model="gpt-9-preview")
    # A model outside the price table gets the one bounded label "other", never a label of its own.
    assert proxy.metric("flexproxy_tokens_total", model="other", tier="standard", kind="input") == 1_000_000
    assert proxy.metric("flexproxy_unpriced_responses_total", model="other") == 1
    assert proxy.metric("flexproxy_cost_usd_total") == 0
    assert "gpt-9-preview" not in proxy.metrics()


def test_a_model_outside_flex_is_priced_at_standard(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(usage=USAGE))
    ask(proxy, "chat", stream=False, model="gpt-4.1")  # $2.00 input, $0.50 cached, $8.00 output
    assert proxy.metric("flexproxy_cost_usd_total", model="gpt-4.1", tier="standard") == pytest.approx(5.70)
    assert proxy.metric("flexproxy_unpriced_responses_total") == 0
    assert proxy.metric("flexproxy_cost_saved_usd_total", model="gpt-4.1") == 0


def test_metrics_carry_no_keys_or_paths(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(api_key="sk-proxy-secret")
    httpx.get(proxy.base_url + "/files/file-abc123", headers={"authorization": "Bearer sk-client-secret"})
    ask(proxy, "chat", stream=False)
    text = proxy.metrics()
    assert "secret" not in text and "file-abc123" not in text
    assert proxy.metric("flexproxy_requests_total", endpoint="other") == 1


def test_one_json_log_line_per_request(make_proxy, sim: Simulator, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(log_format="json", api_key="sk-proxy-secret")
    sim.script(Reply(kind="flex_429"), Reply(usage=USAGE))
    with caplog.at_level(logging.INFO, logger="flex_proxy"):
        proxy.client(api_key="sk-client-secret").chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "flex_proxy.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["endpoint"] == "chat" and line["model"] == "o3"
    assert (line["requested_tier"], line["served_tier"], line["attempts"], line["outcome"]) == ("flex", "flex", 2, "ok")
    assert (line["input_tokens"], line["cached_tokens"], line["output_tokens"]) == (1_000_000, 200_000, 500_000)
    assert line["reasoning_tokens"] == 100_000
    assert line["cost_usd"] == pytest.approx(FLEX_COST) and line["saved_usd"] == pytest.approx(FLEX_COST)
    assert line["upstream_request_id"].startswith("req_") and "request_id" not in line  # upstream's, not ours
    assert line["level"] == "info" and line["ts"].endswith("Z")
    assert line["client_addr"] == "127.0.0.1"
    assert "secret" not in caplog.text


def test_money_is_kept_in_whole_nano_dollars_and_shown_without_float_noise() -> None:
    metrics = Metrics(known_models={"o3"}, registry=CollectorRegistry(), clients=("web",), flex_models=("o3",),
                      process=False)  # fmt: skip
    floats = 0.0
    for _ in range(20):
        metrics.cost.add(100_000, "o3", "web", "flex")  # $0.0001 each
        floats += 0.0001
    assert floats != 0.002  # what a float counter would have shown
    text = generate_latest(metrics.registry).decode()
    assert '\nflexproxy_cost_usd_total{client="web",model="o3",tier="flex"} 0.002\n' in text
    assert "# TYPE flexproxy_cost_usd_total counter\n" in text
    # Pre-created at 0 for the flex families and named clients, as before: saved, lost, cost by flex and standard.
    for line in (
        'flexproxy_cost_usd_total{client="web",model="o3",tier="standard"} 0.0',
        'flexproxy_cost_saved_usd_total{client="web",model="o3"} 0.0',
        'flexproxy_savings_lost_usd_total{client="web",model="o3"} 0.0',
    ):
        assert "\n" + line + "\n" in text, line
    assert "flexproxy_shadow_savings_usd_total{" not in text  # created by its first answer only, as before
    metrics.shadow_saved.add(1, "o3", "web")
    shown = generate_latest(metrics.registry).decode()
    assert 'flexproxy_shadow_savings_usd_total{client="web",model="o3"} 1e-09' in shown
    assert (metrics.cost.total(), metrics.shadow_saved.total()) == (2_000_000, 1)


def test_a_request_through_the_proxy_shows_exact_money(proxy: ProxyServer, sim: Simulator) -> None:
    # 1,234 input and 567 output tokens of o3 on flex: $0.001234 + $0.002268 = $0.003502 exactly.
    for _ in range(3):
        sim.script(Reply(usage={"input": 1_234, "output": 567}))
        ask(proxy, "chat", stream=False)
    text = proxy.metrics()
    assert '\nflexproxy_cost_usd_total{client="default",model="o3",tier="flex"} 0.010506\n' in text
    assert '\nflexproxy_cost_saved_usd_total{client="default",model="o3"} 0.010506\n' in text


def utc(text: str) -> float:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_the_log_line_says_when_the_request_started_and_ended(make_proxy, sim: Simulator, caplog) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(log_format="json")
    sim.script(Reply(delay_s=0.3))
    before = time.time()
    with caplog.at_level(logging.INFO, logger="flex_proxy"):
        proxy.client().chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    after = time.time()
    (record,) = [r for r in caplog.records if r.name == "flex_proxy.access"]
    line = json.loads(JsonFormatter().format(record))
    start, end = utc(line["start"]), utc(line["end"])
    assert before - 0.002 <= start < end <= after + 0.002
    assert end - start == pytest.approx(line["duration_ms"] / 1000, abs=0.002)  # the ms of both ends
    assert line["duration_ms"] >= 300


def test_a_bad_key_is_an_auth_failure_of_no_client(make_proxy, sim: Simulator, caplog) -> None:  # type: ignore[no-untyped-def]
    """Not a bad body of the bare-key client: its own outcome, the reserved client `none`, no tier; its 401 has
    a request id of the proxy's own, which its log line carries beside the caller's address (never the key)."""
    proxy = make_proxy(api_key="sk-proxy-secret", client_keys="ck-good-secret")
    with caplog.at_level(logging.INFO, logger="flex_proxy"):
        with pytest.raises(openai.AuthenticationError) as caught:
            proxy.client(api_key="ck-wrong-secret").chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
        # A bad body from a client with a good key stays a bad request, of that client.
        good_key = {"authorization": "Bearer ck-good-secret"}
        bad = httpx.post(proxy.base_url + "/chat/completions", content=b"{", headers=good_key)
    assert bad.status_code == 400
    assert caught.value.response.headers["x-flex-requested-tier"] == "none"
    request_id = caught.value.response.headers["x-request-id"]
    assert re.fullmatch(r"req_flexproxy_[0-9a-f]{24}", request_id)
    assert proxy.metric("flexproxy_requests_total", outcome="auth_failed", client="none", requested_tier="none",
                        served_tier="none", model="none") == 1  # fmt: skip
    assert proxy.metric("flexproxy_requests_total", outcome="bad_request", client="default", requested_tier="none") == 1
    assert proxy.metric("flexproxy_outcomes_total", endpoint="chat", outcome="auth_failed") == 1
    assert proxy.metric("flexproxy_outcomes_total", endpoint="chat", outcome="bad_request") == 1
    lines = [r.fields for r in caplog.records if r.name == "flex_proxy.access"]  # type: ignore[attr-defined]
    refused = next(line for line in lines if line["outcome"] == "auth_failed")
    assert refused["status"] == 401 and refused["client"] == "none" and refused["client_addr"] == "127.0.0.1"
    assert refused["request_id"] == request_id and "upstream_request_id" not in refused
    assert "secret" not in caplog.text and "secret" not in proxy.metrics()
    assert sim.requests == []


def test_every_outcome_and_answered_pair_is_counted_exactly_once(proxy: ProxyServer, sim: Simulator) -> None:
    """The exact counters agree with the breakdown: one increment per request, in the right place."""
    sim.script(Reply(), Reply(kind="quota_429"))
    ask(proxy, "chat", stream=False)
    with pytest.raises(openai.RateLimitError):
        ask(proxy, "responses", stream=False)
    text = proxy.metrics()
    outcomes = {o: proxy.metric("flexproxy_outcomes_total", outcome=o) for o in OUTCOMES}
    assert outcomes == {o: 1.0 if o in ("ok", "quota") else 0.0 for o in OUTCOMES}
    assert proxy.metric("flexproxy_outcomes_total", endpoint="responses", outcome="quota") == 1
    assert proxy.metric("flexproxy_answered_total", endpoint="chat", requested_tier="flex", served_tier="flex") == 1
    assert proxy.metric("flexproxy_answered_total") == 1  # the quota error is no answer
    assert proxy.metric("flexproxy_requests_total") == sum(outcomes.values())
    assert text.count("flexproxy_outcomes_total{") == 3 * len(OUTCOMES) + 10  # every pair from start, no new one


@pytest.mark.parametrize(("settings", "gate_series"), [({}, True), ({"flex_gate": False}, False),
                                                       ({"gate_scope": "model+key"}, False)])  # fmt: skip
def test_a_family_gets_its_gate_series_only_where_a_gate_is_named_after_it(
    make_proxy, sim: Simulator, settings: dict[str, object], gate_series: bool
) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(**settings)
    ask(proxy, "chat", stream=False)
    text = proxy.metrics()
    assert ('flexproxy_gate_transitions_total{model="o3",to="busy"} 0.0' in text) is gate_series
    assert ('flexproxy_fallbacks_total{endpoint="chat",model="o3"} 0.0' in text)  # the family's own, either way
