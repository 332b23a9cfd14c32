"""The fault table of docs/faults.md, one test per row: the real proxy under uvicorn, a scripted upstream (the
simulator, or a raw one) on 127.0.0.1, and the official SDK as the client wherever a user would use it.

Each row checks what the client received, how many attempts reached upstream (`len(sim.requests)`), the gaps
between them, that upstream was asked to do (and so bills) the work at most once, and that the proxy's own
counters agree with what upstream saw. Timeouts are shrunk through settings so the whole file takes seconds.
Absence (no further attempt) is proved by bounded polling, never by a sleep and an assert.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import rawup
from conftest import ProxyServer
from openai.types.chat import ChatCompletionMessageParam
from rawup import RawRequest, RawUpstream

from proxy.sim import Reply, SimOptions, SimServer, Simulator

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
MIN_GAP_S = 0.05  # min_backoff_s in these tests: the shortest wait between two attempts of one request
EARLY_S = 0.003  # a timer may fire a hair before its time; gaps are checked against the floor minus this
FAST = {
    "upstream_timeout_s": 0.5,
    "standard_timeout_s": 0.5,
    "stream_idle_timeout_s": 0.5,
    "min_backoff_s": MIN_GAP_S,
    "reset_retry_window_s": 0.25,
}
CONTEXT_LENGTH = {
    "message": "This model's maximum context length is 200000 tokens. However, your messages resulted in 210345 "
    "tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error",
    "param": "messages",
    "code": "context_length_exceeded",
}
CONTENT_FILTER = {
    "message": "Your request was rejected as a result of our safety system.",
    "type": "invalid_request_error",
    "param": None,
    "code": "content_policy_violation",
}

Maker = Callable[..., ProxyServer]


# -- helpers ----------------------------------------------------------------------------------------------------


def fast(make_proxy: Maker, **overrides: Any) -> ProxyServer:
    return make_proxy(**{**FAST, **overrides})


def chat(client: openai.OpenAI, model: str = "o3", **kwargs: Any) -> Any:
    return client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kwargs)


def chat_stream(client: openai.OpenAI, model: str = "o3", **kwargs: Any) -> Any:
    return client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kwargs)


def gaps(sim: Simulator) -> list[float]:
    times = [recorded.received_at for recorded in sim.requests]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def assert_gaps_at_least(sim: Simulator, floor: float) -> None:
    assert all(gap >= floor - EARLY_S for gap in gaps(sim)), (gaps(sim), floor)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def settled(sim: Simulator) -> Any:
    """Billing once every upstream exchange has ended; at most one attempt was ever accepted (billed)."""
    assert sim.settle(5), "an upstream exchange is still open"
    billing = sim.billing()
    assert billing.accepted <= 1, f"upstream was asked to do the work {billing.accepted} times"
    return billing


def counted(proxy: ProxyServer, sim: Simulator, outcome: str, requests: int = 1) -> None:
    """The proxy counted the request(s) with `outcome`, and every attempt upstream saw (the counts can lag the
    client by a moment when the client left, so they are polled)."""

    def agree() -> bool:
        answered = proxy.metric("flexproxy_requests_total", outcome=outcome) == requests
        return answered and proxy.metric("flexproxy_upstream_attempts_total") == len(sim.requests)

    assert eventually(agree), (
        {o: proxy.metric("flexproxy_requests_total", outcome=o) for o in (outcome, "client_disconnected", "ok")},
        proxy.metric("flexproxy_upstream_attempts_total"),
        len(sim.requests),
    )


def no_more_attempts(sim: Simulator, count: int, within: float) -> None:
    """Bounded proof of absence: upstream sees no attempt beyond `count` for `within` seconds. (The SDK's own
    re-sends are over by the time it returns or raises; this is for anything the proxy still has going.)"""
    assert not sim.wait_for(lambda: len(sim.requests) > count, timeout=within), [r.outcome for r in sim.requests]
    assert len(sim.requests) == count


def final_error(caught: pytest.ExceptionInfo[openai.APIStatusError]) -> Any:
    """A final error: OpenAI-shaped, marked so the SDK does not re-send it, one retry-after at most."""
    response = caught.value.response
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert response.headers.get_list("x-should-retry") == ["false"]
    assert "retry-after-ms" not in response.headers
    assert len(response.headers.get_list("retry-after")) <= 1
    return response.headers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- 429s -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-gate"])
def test_flex_429_without_retry_after_is_retried_on_flex_after_a_gap(
    make_proxy: Maker, sim: Simulator, gate: bool
) -> None:
    proxy = fast(make_proxy, flex_gate=gate)
    sim.script(Reply("flex_429"))
    raw = chat(proxy.client())
    assert raw.http_response.status_code == 200
    assert raw.parse().service_tier == "flex"
    assert raw.headers["x-flex-attempts"] == "2"
    assert [r.tier for r in sim.requests] == ["flex", "flex"]
    assert_gaps_at_least(sim, MIN_GAP_S)
    billing = settled(sim)
    assert (billing.accepted, billing.refused) == (1, 1)
    counted(proxy, sim, "ok")


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-gate"])
def test_flex_429_retry_keeps_the_minimum_gap(make_proxy: Maker, sim: Simulator, gate: bool) -> None:
    # min_backoff_s is "the shortest wait between two attempts of one request", through the gate too.
    proxy = fast(make_proxy, flex_gate=gate, min_backoff_s=0.3)
    sim.script(Reply("flex_429"))
    assert chat(proxy.client()).parse().service_tier == "flex"
    assert len(sim.requests) == 2
    assert_gaps_at_least(sim, 0.3)


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-gate"])
@pytest.mark.parametrize("header", ["retry-after-ms", "retry-after"])
def test_flex_429_with_retry_after_waits_at_least_that_long(
    make_proxy: Maker, sim: Simulator, gate: bool, header: str
) -> None:
    proxy = fast(make_proxy, flex_gate=gate)
    wait, reply = (
        (0.4, Reply("flex_429", retry_after_ms=400))
        if header == "retry-after-ms"
        else (1.0, Reply("flex_429", retry_after_s=1))
    )
    sim.script(reply)
    raw = chat(proxy.client())
    assert raw.parse().service_tier == "flex"
    assert len(sim.requests) == 2
    assert_gaps_at_least(sim, wait)
    settled(sim)
    counted(proxy, sim, "ok")


def test_persistent_flex_429_falls_back_to_standard_after_max_flex_attempts_without_the_gate(
    make_proxy: Maker, sim: Simulator
) -> None:
    proxy = fast(make_proxy, max_flex_attempts=3, flex_gate=False)
    sim.script(*[Reply("flex_429")] * 3)
    raw = chat(proxy.client())
    assert raw.parse().service_tier == "default"
    assert raw.headers["x-flex-served-tier"] == "default"
    assert [r.tier for r in sim.requests] == ["flex", "flex", "flex", "auto"]
    assert_gaps_at_least(sim, MIN_GAP_S)
    billing = settled(sim)
    assert (billing.accepted, billing.refused) == (1, 3)
    counted(proxy, sim, "ok")
    assert proxy.metric("flexproxy_fallbacks_total") == 1


def test_persistent_flex_429_waits_in_the_gate_for_its_flex_budget_then_falls_back(
    make_proxy: Maker, sim: Simulator
) -> None:
    """With the gate, the request waits for flex until its flex deadline, whatever FLEX_PROXY_MAX_FLEX_ATTEMPTS
    says (the gate's probes do not use up its attempts), then re-sends once on standard."""
    proxy = fast(make_proxy, max_flex_attempts=1, flex_budget_s=0.6)
    sim.options = SimOptions(flex_busy_share=1.0)
    started = time.monotonic()
    raw = chat(proxy.client())
    took = time.monotonic() - started
    assert raw.parse().service_tier == "default"
    tiers = [r.tier for r in sim.requests]
    assert tiers[-1] == "auto" and set(tiers[:-1]) == {"flex"} and len(tiers) >= 3  # probes past the 1 attempt
    assert 0.6 <= took < 2.0
    assert_gaps_at_least(sim, MIN_GAP_S)
    billing = settled(sim)
    assert billing.accepted == 1
    counted(proxy, sim, "ok")
    assert proxy.metric("flexproxy_fallbacks_total") == 1


def test_persistent_flex_429_on_backoff_strategy_ends_in_a_final_429_without_the_gate(
    make_proxy: Maker, sim: Simulator
) -> None:
    proxy = fast(make_proxy, max_flex_attempts=3, flex_gate=False)
    sim.script(*[Reply("flex_429")] * 5)
    client = proxy.client(max_retries=2, default_headers={"X-Flex-On-Unavailable": "backoff"})
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="o3", messages=MESSAGES)
    headers = final_error(caught)
    assert int(headers["retry-after"]) >= 1
    assert caught.value.code == "resource_unavailable"
    no_more_attempts(sim, 3, within=0.2)  # max_flex_attempts; the SDK's own 2 retries did not multiply them
    assert_gaps_at_least(sim, MIN_GAP_S)
    assert settled(sim).accepted == 0
    counted(proxy, sim, "flex_unavailable")


def test_persistent_flex_429_on_backoff_strategy_waits_in_the_gate_then_ends_in_a_final_429(
    make_proxy: Maker, sim: Simulator
) -> None:
    proxy = fast(make_proxy, max_flex_attempts=1, flex_budget_s=0.6)
    sim.options = SimOptions(flex_busy_share=1.0)
    client = proxy.client(max_retries=2, default_headers={"X-Flex-On-Unavailable": "backoff"})
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="o3", messages=MESSAGES)
    assert 0.6 <= time.monotonic() - started < 2.0  # waited for its whole flex budget
    headers = final_error(caught)
    assert int(headers["retry-after"]) >= 1
    attempts = len(sim.requests)
    assert attempts >= 3 and all(r.tier == "flex" for r in sim.requests)  # never paid standard
    no_more_attempts(sim, attempts, within=0.2)  # the SDK's own 2 retries did not multiply them
    assert_gaps_at_least(sim, MIN_GAP_S)
    assert settled(sim).accepted == 0
    counted(proxy, sim, "flex_unavailable")


def test_persistent_rate_limit_429_ends_in_a_final_429_with_one_retry_after(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(*[Reply("rate_limit_429", retry_after_ms=100)] * 3)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(proxy.client(max_retries=2))
    headers = final_error(caught)
    assert headers["retry-after"] == "1"  # 100 ms, in whole seconds
    assert caught.value.code == "rate_limit_exceeded"
    no_more_attempts(sim, 3, within=0.2)  # 1 + max_retries
    assert [r.tier for r in sim.requests] == ["flex"] * 3  # a rate limit is shared by the tiers: no fallback
    assert_gaps_at_least(sim, 0.1)
    assert settled(sim).accepted == 0
    counted(proxy, sim, "rate_limited")


def test_rate_limit_with_retry_after_ms_is_retried_on_the_same_tier_after_it(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("rate_limit_429", retry_after_ms=300))
    raw = chat(proxy.client())
    assert raw.parse().service_tier == "flex"
    assert [r.tier for r in sim.requests] == ["flex", "flex"]
    assert_gaps_at_least(sim, 0.3)
    settled(sim)
    counted(proxy, sim, "ok")


def test_rate_limit_asking_for_longer_than_the_cap_is_answered_at_once(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy, max_retry_after_s=1)
    sim.script(Reply("rate_limit_429", retry_after_ms=5000))
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        chat(proxy.client())
    assert time.monotonic() - started < 1.0  # not asleep for 5 s
    assert final_error(caught)["retry-after"] == "5"  # upstream's wait, passed on to the client
    no_more_attempts(sim, 1, within=0.2)
    settled(sim)
    counted(proxy, sim, "rate_limited")


def test_insufficient_quota_is_passed_through_once(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("quota_429"))
    with pytest.raises(openai.RateLimitError) as caught:
        chat(proxy.client(max_retries=2))
    final_error(caught)
    assert caught.value.code == "insufficient_quota"
    no_more_attempts(sim, 1, within=0.2)
    assert settled(sim).accepted == 0
    counted(proxy, sim, "quota")


# -- 4xx -------------------------------------------------------------------------------------------------------


def test_400_on_service_tier_the_proxy_chose_is_resent_once_without_it(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("tier_400"))
    raw = chat(proxy.client())
    assert raw.http_response.status_code == 200
    assert [r.tier for r in sim.requests] == ["flex", None]
    assert b"service_tier" not in sim.requests[1].body
    billing = settled(sim)
    assert (billing.accepted, billing.refused) == (1, 1)
    counted(proxy, sim, "ok")
    assert proxy.metric("flexproxy_tier_rejections_total") == 1


def test_400_on_service_tier_the_client_chose_is_passed_through(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("tier_400"))
    with pytest.raises(openai.BadRequestError) as caught:
        chat(proxy.client(), service_tier="flex")
    final_error(caught)
    assert caught.value.param == "service_tier"
    no_more_attempts(sim, 1, within=0.2)
    settled(sim)
    counted(proxy, sim, "tier_rejected")


@pytest.mark.parametrize("error", [CONTEXT_LENGTH, CONTENT_FILTER], ids=["context-length", "content-filter"])
def test_400_that_no_retry_can_fix_is_passed_through_once(
    make_proxy: Maker, sim: Simulator, error: dict[str, Any]
) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("ok", status=400, body=json.dumps({"error": error}).encode()))
    with pytest.raises(openai.BadRequestError) as caught:
        chat(proxy.client(max_retries=2))
    final_error(caught)
    assert caught.value.response.json() == {"error": error}  # upstream's body, as it came
    no_more_attempts(sim, 1, within=0.2)
    assert settled(sim).accepted == 0
    counted(proxy, sim, "upstream_error")


# -- 5xx -------------------------------------------------------------------------------------------------------


def test_500_once_is_retried_after_the_minimum_gap(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("server_error", status=500))
    raw = chat(proxy.client())
    assert raw.http_response.status_code == 200
    assert raw.headers["x-flex-attempts"] == "2"
    assert [r.tier for r in sim.requests] == ["flex", "flex"]
    assert_gaps_at_least(sim, MIN_GAP_S)
    billing = settled(sim)
    assert (billing.accepted, billing.refused) == (1, 1)
    counted(proxy, sim, "ok")


def test_503_persistent_ends_in_a_final_503(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(*[Reply("server_error", status=503)] * 5)
    with pytest.raises(openai.InternalServerError) as caught:
        chat(proxy.client(max_retries=2))
    assert caught.value.status_code == 503
    final_error(caught)
    assert caught.value.code == "server_is_overloaded"
    no_more_attempts(sim, 3, within=0.2)  # 1 + max_retries, and no SDK re-sends on top
    assert_gaps_at_least(sim, MIN_GAP_S)
    assert settled(sim).accepted == 0
    counted(proxy, sim, "server_error")


# -- connections -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reset", "drop"])
def test_connection_closed_before_headers_at_once_is_resent(make_proxy: Maker, sim: Simulator, kind: str) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply(kind))
    raw = chat(proxy.client())
    assert raw.http_response.status_code == 200
    assert len(sim.requests) == 2
    assert_gaps_at_least(sim, MIN_GAP_S)
    billing = settled(sim)
    assert (billing.accepted, billing.refused) == (1, 1)
    counted(proxy, sim, "ok")


@pytest.mark.parametrize("kind", ["reset", "drop"])
def test_connection_closed_after_a_silence_is_not_resent(make_proxy: Maker, sim: Simulator, kind: str) -> None:
    # Silent longer than reset_retry_window_s, then closed: upstream may have been working, so no re-send.
    proxy = fast(make_proxy, upstream_timeout_s=2, reset_retry_window_s=0.2)
    sim.script(Reply(kind, delay_s=0.5))
    with pytest.raises(openai.InternalServerError) as caught:
        chat(proxy.client(max_retries=2))
    assert caught.value.status_code == 502
    final_error(caught)
    assert caught.value.code == "upstream_disconnected"
    no_more_attempts(sim, 1, within=0.2)
    assert settled(sim).undelivered == 1  # billed, never seen
    counted(proxy, sim, "unreachable")
    # The cost metrics must not count less than upstream billed: accepted work nobody read is counted apart.
    assert eventually(lambda: proxy.metric("flexproxy_unread_answers_total") == 1, 2), (
        "a request upstream accepted (silent, then dropped) is missing from flexproxy_unread_answers_total"
    )


@pytest.mark.parametrize(
    ("model", "tier", "timeout"), [("o3", "flex", 1.5), ("gpt-4.1", "standard", 0.3)], ids=["flex", "standard"]
)
def test_accepted_then_silent_times_out_by_tier_and_is_not_resent(
    make_proxy: Maker, sim: Simulator, model: str, tier: str, timeout: float
) -> None:
    proxy = fast(make_proxy, upstream_timeout_s=1.5, standard_timeout_s=0.3)
    sim.script(Reply("hang"))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        chat(proxy.client(max_retries=2), model=model)
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    final_error(caught)
    assert caught.value.code == "upstream_timeout"
    assert timeout <= elapsed < timeout + 0.9, elapsed  # the tier's own time to first byte, not the other's
    assert sim.requests[0].closed_by_peer.wait(5)  # the proxy closed the upstream request
    no_more_attempts(sim, 1, within=0.2)
    assert settled(sim).undelivered == 1
    counted(proxy, sim, "timeout")
    assert proxy.metric("flexproxy_requests_total", outcome="timeout", requested_tier=tier) == 1
    assert proxy.metric("flexproxy_upstream_attempts_total", tier=tier, status_class="timeout") == 1
    assert proxy.metric("flexproxy_unread_answers_total", tier=tier) == 1


def test_flex_may_stay_silent_longer_than_standard(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy, upstream_timeout_s=2.0, standard_timeout_s=0.3)
    sim.script(Reply("slow", delay_s=0.6))
    raw = chat(proxy.client())
    assert raw.parse().service_tier == "flex"
    assert len(sim.requests) == 1
    counted(proxy, sim, "ok")


# -- streams -----------------------------------------------------------------------------------------------------


def test_slow_first_token_within_the_timeout_is_a_whole_stream(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy, upstream_timeout_s=2.0)
    sim.script(Reply("slow_first_token", delay_s=0.6))
    chunks = list(chat_stream(proxy.client()))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(sim.requests) == 1
    assert settled(sim).delivered == 1
    counted(proxy, sim, "ok")


def test_slow_first_token_past_the_timeout_is_a_504_not_resent(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("slow_first_token", delay_s=30))
    with pytest.raises(openai.InternalServerError) as caught:
        chat_stream(proxy.client(max_retries=2))
    assert caught.value.status_code == 504
    final_error(caught)
    assert sim.requests[0].closed_by_peer.wait(5)
    no_more_attempts(sim, 1, within=0.2)
    assert settled(sim).undelivered == 1
    counted(proxy, sim, "timeout")


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_stream_cut_ends_with_one_in_band_error(make_proxy: Maker, sim: Simulator, endpoint: str) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("cut_stream", events=3))
    client = proxy.client(max_retries=2)
    if endpoint == "chat":
        received = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in chat_stream(client):
                received.append(chunk)
        assert caught.value.code == "upstream_incomplete"
        assert 1 <= len(received) <= 4
    else:
        events = list(client.responses.create(model="o3", input="hi", stream=True))
        assert [e.type for e in events].count("error") == 1
        assert events[-1].type == "error" and events[-1].code == "upstream_incomplete"
        assert "response.completed" not in [e.type for e in events]
    no_more_attempts(sim, 1, within=0.2)
    assert settled(sim).undelivered == 1
    counted(proxy, sim, "stream_cut")
    assert proxy.metric("flexproxy_unread_answers_total") == 1


def test_non_stream_body_cut_is_a_502_not_resent(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("cut_stream"))
    with pytest.raises(openai.InternalServerError) as caught:
        chat(proxy.client(max_retries=2))
    assert caught.value.status_code == 502
    final_error(caught)
    assert caught.value.code == "upstream_incomplete"
    no_more_attempts(sim, 1, within=0.2)
    assert settled(sim).undelivered == 1
    counted(proxy, sim, "stream_cut")


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_stream_stall_ends_with_an_idle_timeout_error_and_closes_upstream(
    make_proxy: Maker, sim: Simulator, endpoint: str
) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("stall", events=2, delay_s=30))
    client = proxy.client(max_retries=2)
    started = time.monotonic()
    if endpoint == "chat":
        with pytest.raises(openai.APIError) as caught:
            for _ in chat_stream(client):
                pass
        assert caught.value.code == "stream_idle_timeout"
    else:
        events = list(client.responses.create(model="o3", input="hi", stream=True))
        assert events[-1].type == "error" and events[-1].code == "stream_idle_timeout"
        assert [e.type for e in events].count("error") == 1
    assert 0.5 <= time.monotonic() - started < 2.0
    assert sim.requests[0].closed_by_peer.wait(5)
    no_more_attempts(sim, 1, within=0.2)
    assert settled(sim).undelivered == 1
    counted(proxy, sim, "stream_cut")


def test_non_stream_stall_is_a_504_not_resent(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("stall", delay_s=30))
    with pytest.raises(openai.InternalServerError) as caught:
        chat(proxy.client(max_retries=2))
    assert caught.value.status_code == 504
    final_error(caught)
    assert sim.requests[0].closed_by_peer.wait(5)
    no_more_attempts(sim, 1, within=0.2)
    assert settled(sim).undelivered == 1
    counted(proxy, sim, "timeout")


def test_malformed_event_is_passed_on_as_it_came(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("malformed_event"))
    body = {"model": "o3", "messages": MESSAGES, "stream": True}
    with httpx.stream(
        "POST", proxy.base_url + "/chat/completions", json=body, headers={"authorization": "Bearer k"}
    ) as r:
        assert r.status_code == 200
        data = r.read()
    assert b'data: {"id": "chatcmpl-broken", "choices": [\n\n' in data  # the bytes upstream sent, untouched
    assert re.search(rb"data: \[DONE\]\n\n: x-flex-cost-usd=\d+\.\d{8} x-flex-saved-usd=\d+\.\d{8}\n\n$", data)
    assert b'"error"' not in data
    assert len(sim.requests) == 1
    assert settled(sim).delivered == 1
    counted(proxy, sim, "ok")
    assert proxy.metric("flexproxy_tokens_total", kind="output") == 20  # the usage after it was still read


def test_malformed_event_reaches_the_sdk_as_it_would_without_the_proxy(make_proxy: Maker, sim: Simulator) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("malformed_event"))
    with pytest.raises(json.JSONDecodeError):  # the SDK's own reaction to a non-JSON event
        for _ in chat_stream(proxy.client()):
            pass
    assert len(sim.requests) == 1


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_without_done_is_whole(make_proxy: Maker, sim: Simulator, include_usage: bool) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("no_done"))
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(chat_stream(proxy.client(), **extra))  # ends without raising
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finished] == ["stop"]
    assert (chunks[-1].usage is not None) is include_usage
    assert len(sim.requests) == 1
    assert settled(sim).delivered == 1
    counted(proxy, sim, "ok")
    assert proxy.metric("flexproxy_tokens_total", kind="output") == 20


@pytest.mark.parametrize("kind", ["stream_error", "prelude_then_error"])
@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_flex_error_before_the_stream_commits_is_retried(
    make_proxy: Maker, sim: Simulator, kind: str, endpoint: str
) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply(kind))
    client = proxy.client()
    if endpoint == "chat":
        chunks = list(chat_stream(client))
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        events = list(client.responses.create(model="o3", input="hi", stream=True))
        types = [e.type for e in events]
        assert types.count("response.created") == 1 and types[-1] == "response.completed"
        assert "error" not in types
    assert [r.tier for r in sim.requests] == ["flex", "flex"]
    assert_gaps_at_least(sim, MIN_GAP_S)
    billing = settled(sim)
    assert (billing.accepted, billing.refused) == (1, 1)
    counted(proxy, sim, "ok")


def _sse_answer(*events: bytes) -> bytes:
    """A 200 event stream that ends when the connection closes."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    return head + b"".join(events)


SERVER_ERROR = {"message": "The server had an error while processing your request.", "type": "server_error",
                "param": None, "code": "server_error"}  # fmt: skip
RESPONSE = {"id": "resp_1", "object": "response", "status": "in_progress", "model": "o3", "service_tier": "auto"}
OPENING = (
    b"event: response.created\ndata: " + json.dumps({"type": "response.created", "sequence_number": 0,
                                                      "response": RESPONSE}).encode() + b"\n\n"
    b"event: response.in_progress\ndata: " + json.dumps({"type": "response.in_progress", "sequence_number": 1,
                                                          "response": RESPONSE}).encode() + b"\n\n"
)  # fmt: skip
DELTA = {"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}
CHUNK = json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "o3", "service_tier": "flex",
                    "choices": [DELTA]}).encode()  # fmt: skip


@pytest.mark.parametrize(
    ("endpoint", "stream"),
    [
        # After a Responses stream's opening events: the work was accepted.
        ("responses", OPENING + b"event: error\ndata: " + json.dumps({"type": "error", "sequence_number": 2,
                                                                       **SERVER_ERROR}).encode() + b"\n\n"),
        # As a chat stream's first event, after the 200 status line: the work may have been accepted.
        ("chat", b"data: " + json.dumps({"error": {**SERVER_ERROR, "code": "rate_limit_exceeded",
                                                    "type": "requests"}}).encode() + b"\n\n"),
    ],
    ids=["responses-server-error-after-opening", "chat-rate-limit-first-event"],
)
def test_an_in_band_error_other_than_flex_capacity_is_answered_as_it_came(
    make_proxy: Maker, endpoint: str, stream: bytes
) -> None:
    """A status line and headers came first, so upstream may have accepted (and billed) the work: only a
    flex-capacity refusal, which is not charged, may be re-sent. Anything else reaches the client as it came."""

    async def answer(request: Any, writer: Any) -> None:
        writer.write(_sse_answer(stream))

    with RawUpstream(answer) as up:
        proxy = fast(make_proxy, upstream_base_url=up.url + "/v1")
        path = "/chat/completions" if endpoint == "chat" else "/responses"
        body = {"model": "o3", "stream": True, **({"messages": MESSAGES} if endpoint == "chat" else {"input": "hi"})}
        got = httpx.post(proxy.base_url + path, json=body, headers={"authorization": "Bearer k"}, timeout=10)
        assert got.status_code == 200
        assert got.content == stream  # upstream's own bytes, nothing added
        assert len(up.requests) == 1
        assert eventually(lambda: proxy.metric("flexproxy_requests_total", outcome="upstream_error") == 1)
        assert proxy.metric("flexproxy_unread_answers_total") == 0


def test_a_stream_that_ends_with_upstreams_own_error_is_not_a_cut(make_proxy: Maker) -> None:
    """Upstream streamed some content, then its own error event, then closed: the client gets exactly that (the
    SDK raises upstream's error), with no error of the proxy's appended; counted as upstream_error, not
    stream_cut, and no unread answer."""
    stream = b"data: " + CHUNK + b"\n\n" + b"data: " + json.dumps({"error": SERVER_ERROR}).encode() + b"\n\n"

    async def answer(request: Any, writer: Any) -> None:
        writer.write(_sse_answer(stream))

    with RawUpstream(answer) as up:
        proxy = fast(make_proxy, upstream_base_url=up.url + "/v1")
        body = {"model": "o3", "stream": True, "messages": MESSAGES, "stream_options": {"include_usage": True}}
        got = httpx.post(proxy.base_url + "/chat/completions", json=body, headers={"authorization": "Bearer k"})
        assert got.content == stream
        with pytest.raises(openai.APIError, match="The server had an error"):
            list(chat_stream(proxy.client(), stream_options={"include_usage": True}))
        assert len(up.requests) == 2  # one per client request: neither was re-sent
        assert eventually(lambda: proxy.metric("flexproxy_requests_total", outcome="upstream_error") == 2)
        assert proxy.metric("flexproxy_requests_total", outcome="stream_cut") == 0
        assert proxy.metric("flexproxy_unread_answers_total") == 0


# -- upstream down, then back -------------------------------------------------------------------------------------


@pytest.fixture
def own_port_sim() -> Iterator[tuple[Simulator, int]]:
    yield Simulator(SimOptions()), free_port()


def test_upstream_down_then_back(make_proxy: Maker, own_port_sim: tuple[Simulator, int]) -> None:
    sim, port = own_port_sim
    proxy = fast(make_proxy, upstream_base_url=f"http://127.0.0.1:{port}/v1")
    client = proxy.client(max_retries=2)
    with SimServer(sim, port=port):
        assert chat(client).http_response.status_code == 200
    # Down: nothing listens. Each refused connection is re-sent (nothing reached upstream), then a final 502.
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client)
    assert caught.value.status_code == 502
    final_error(caught)
    assert caught.value.code == "upstream_unreachable"
    assert time.monotonic() - started >= 2 * MIN_GAP_S - EARLY_S  # two gaps between three attempts
    assert proxy.metric("flexproxy_upstream_attempts_total", status_class="connection_error") == 3
    assert proxy.metric("flexproxy_requests_total", outcome="unreachable") == 1
    # Back on the same port: answered again.
    with SimServer(sim, port=port):
        raw = chat(client)
        assert raw.http_response.status_code == 200
    assert len(sim.requests) == 2  # the whole outage reached upstream not once
    assert sim.billing().accepted == 2  # the two answers, each billed once


def test_upstream_back_during_the_backoff_answers_the_waiting_request(
    make_proxy: Maker, own_port_sim: tuple[Simulator, int]
) -> None:
    sim, port = own_port_sim
    proxy = fast(make_proxy, upstream_base_url=f"http://127.0.0.1:{port}/v1", min_backoff_s=0.5)
    holder: list[SimServer] = []

    def come_back() -> None:  # as soon as the proxy has found upstream down once
        if eventually(lambda: proxy.metric("flexproxy_upstream_attempts_total", status_class="connection_error") >= 1):
            holder.append(SimServer(sim, port=port).start())

    thread = threading.Thread(target=come_back)
    thread.start()
    try:
        raw = chat(proxy.client())
        thread.join(10)
        assert raw.http_response.status_code == 200
        assert int(raw.headers["x-flex-attempts"]) >= 2
        assert len(sim.requests) == 1
    finally:
        thread.join(10)
        for server in holder:
            server.stop()


# -- the client leaves -----------------------------------------------------------------------------------------


def _post(proxy: ProxyServer, timeout: float, stream: bool = False) -> None:
    """A client (no SDK deadline header) that gives up after `timeout` seconds and closes its connection."""
    body = {"model": "o3", "messages": MESSAGES, "stream": stream}
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(
            proxy.base_url + "/chat/completions", json=body, headers={"authorization": "Bearer k"}, timeout=timeout
        )


@pytest.mark.parametrize(
    "reply", [Reply("rate_limit_429", retry_after_ms=800), Reply("flex_429", retry_after_ms=800)],
    ids=["rate-limit-backoff", "flex-gate-wait"],
)  # fmt: skip
def test_client_gone_during_backoff_stops_the_retries(make_proxy: Maker, sim: Simulator, reply: Reply) -> None:
    proxy = fast(make_proxy)
    sim.script(reply)
    _post(proxy, timeout=0.3)
    no_more_attempts(sim, 1, within=1.0)  # the retry was due 0.8 s after the 429
    counted(proxy, sim, "client_disconnected")
    assert settled(sim).accepted == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize("reply", [Reply("hang"), Reply("slow_first_token", delay_s=30)], ids=["hang", "headers-only"])
def test_client_gone_before_the_first_event_closes_upstream_at_once(
    make_proxy: Maker, sim: Simulator, reply: Reply, stream: bool
) -> None:
    proxy = fast(make_proxy, upstream_timeout_s=30, standard_timeout_s=30)
    sim.script(reply)
    _post(proxy, timeout=0.4, stream=stream)
    gave_up = time.monotonic()
    assert sim.requests[0].closed_by_peer.wait(5), "the upstream request was left open"
    ended_at = sim.requests[0].ended_at
    assert ended_at is not None and ended_at - gave_up < 2.0  # at once, not when upstream would have answered
    no_more_attempts(sim, 1, within=0.2)
    counted(proxy, sim, "client_disconnected")
    assert proxy.metric("flexproxy_upstream_attempts_total", status_class="cancelled") == 1
    assert settled(sim).undelivered == 1
    assert proxy.metric("flexproxy_unread_answers_total") == 1


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_client_gone_mid_stream_closes_upstream(make_proxy: Maker, sim: Simulator, endpoint: str) -> None:
    proxy = fast(make_proxy)
    sim.script(Reply("ok", events=40, event_interval_s=0.05))
    client = proxy.client()
    stream: Any = (
        chat_stream(client) if endpoint == "chat" else client.responses.create(model="o3", input="hi", stream=True)
    )
    for _, _event in zip(range(4), stream, strict=False):
        pass
    stream.close()
    assert sim.requests[0].closed_by_peer.wait(5), "the upstream stream was left open"
    assert not sim.requests[0].delivered  # the proxy stopped reading before the usage came
    no_more_attempts(sim, 1, within=0.2)
    counted(proxy, sim, "client_disconnected")
    assert settled(sim).undelivered == 1
    assert proxy.metric("flexproxy_unread_answers_total") == 1


# -- a response byte, then the connection ends (the raw upstream, tests/rawup.py) --------------------------------

OK_BODY = json.dumps({
    "id": "chatcmpl-raw", "object": "chat.completion", "created": 0, "model": "o3", "service_tier": "flex",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()  # fmt: skip
STATUS = b"HTTP/1.1 200 OK\r\n"
HEADERS = STATUS + b"content-type: application/json\r\ncontent-length: 400\r\nx-request-id: req_1\r\n"
RawHandler = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[None]]


def _then(data: bytes, rst: bool) -> RawHandler:
    """Send `data` at once, let it arrive, then end the connection with FIN (returning) or RST."""

    async def handler(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        if data:
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(0.05)  # the bytes reach the proxy before the end does
        if rst:
            rawup.reset(writer)

    return handler


async def _answer(request: RawRequest, writer: asyncio.StreamWriter) -> None:
    writer.write(rawup.response(200, [(b"content-type", b"application/json")], OK_BODY))


class Plan:
    """The raw upstream's handler: each connection takes the next step of the plan, then plain answers."""

    def __init__(self) -> None:
        self.steps: list[RawHandler] = []

    async def __call__(self, request: RawRequest, writer: asyncio.StreamWriter) -> None:
        await (self.steps.pop(0) if self.steps else _answer)(request, writer)


@pytest.fixture(scope="module")
def planned() -> Iterator[tuple[Plan, RawUpstream]]:
    plan = Plan()
    with RawUpstream(plan) as upstream:
        yield plan, upstream


@pytest.fixture(scope="module")
def pure_python_parser_proxy(
    planned: tuple[Plan, RawUpstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The real `flex-proxy` process with aiohttp's pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS=1)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")} | {
        "AIOHTTP_NO_EXTENSIONS": "1", "FLEX_PROXY_UPSTREAM_BASE_URL": planned[1].url + "/v1",
        "FLEX_PROXY_PORT": str(port), "FLEX_PROXY_MIN_BACKOFF_S": str(MIN_GAP_S),
        "FLEX_PROXY_DRAIN_DELAY_S": "0",  # stopped with SIGTERM; nothing polls /readyz
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy"], env=env, cwd=tmp_path_factory.mktemp("pyparser"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert eventually(lambda: _answers(url), timeout=20), "flex-proxy did not start"
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(params=["c-parser", "python-parser"])
def raw_proxy_url(
    request: pytest.FixtureRequest, planned: tuple[Plan, RawUpstream], make_proxy: Maker
) -> Iterator[str]:
    """The proxy in front of the planned raw upstream: in this process (aiohttp's C parser), and as a process of
    its own with the pure-Python parser (shared by the tests: they count from where the last one left off)."""
    plan, upstream = planned
    if request.param == "c-parser":
        url = fast(make_proxy, upstream_base_url=upstream.url + "/v1").url
    else:
        url = request.getfixturevalue("pure_python_parser_proxy")
    plan.steps.clear()
    yield url
    plan.steps.clear()


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(
    ("sent", "rst"),
    [(STATUS, False), (STATUS[:-2], False), (HEADERS, False), (STATUS, True), (HEADERS, True)],
    ids=["status-line-close", "part-of-status-line-close", "headers-close", "status-line-reset", "headers-reset"],
)
def test_a_response_byte_then_a_drop_is_never_resent(
    raw_proxy_url: str, planned: tuple[Plan, RawUpstream], sent: bytes, rst: bool, stream: bool
) -> None:
    # Dropped at once, well inside the reset window: without a byte of answer that is a refused request and is
    # re-sent; with one, upstream took the request and may bill it, so the client gets a final 502.
    plan, upstream = planned
    before = len(upstream.requests)
    unread = _metric(raw_proxy_url, "flexproxy_unread_answers_total")
    cut = _metric(raw_proxy_url, "flexproxy_requests_total", outcome="stream_cut")
    plan.steps[:] = [_then(sent, rst)]
    client = openai.OpenAI(base_url=raw_proxy_url + "/v1", api_key="k", max_retries=2)
    with client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="o3", messages=MESSAGES, stream=stream)
    assert caught.value.status_code == 502
    final_error(caught)
    assert caught.value.code == "upstream_incomplete"
    assert not eventually(lambda: len(upstream.requests) > before + 1, timeout=0.3)
    assert len(upstream.requests) == before + 1
    assert eventually(lambda: _metric(raw_proxy_url, "flexproxy_unread_answers_total") == unread + 1, 2)
    assert _metric(raw_proxy_url, "flexproxy_requests_total", outcome="stream_cut") == cut + 1


@pytest.mark.parametrize("rst", [False, True], ids=["close", "reset"])
def test_a_drop_before_any_response_byte_is_still_resent(
    raw_proxy_url: str, planned: tuple[Plan, RawUpstream], rst: bool
) -> None:
    plan, upstream = planned
    before = len(upstream.requests)
    plan.steps[:] = [_then(b"", rst)]
    with openai.OpenAI(base_url=raw_proxy_url + "/v1", api_key="k", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(model="o3", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "hi"
    assert raw.headers["x-flex-attempts"] == "2"
    assert len(upstream.requests) == before + 2


def test_a_status_line_then_silence_is_never_resent_even_where_read_timeouts_are(make_proxy: Maker) -> None:
    """FLEX_PROXY_RETRY_READ_TIMEOUTS re-sends work that got no answer in time; but once a status line and
    headers have come, upstream may have accepted the work, and the silence after them is never re-sent."""

    async def headers_then_silence(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(3)

    with RawUpstream(headers_then_silence) as up:
        proxy = fast(make_proxy, upstream_base_url=up.url + "/v1", retry_read_timeouts=True)
        with pytest.raises(openai.APIStatusError) as caught:
            chat(proxy.client())
        assert caught.value.status_code == 504
        final_error(caught)
        assert len(up.requests) == 1
        assert eventually(lambda: proxy.metric("flexproxy_requests_total", outcome="timeout") == 1)
        assert proxy.metric("flexproxy_unread_answers_total") == 1
