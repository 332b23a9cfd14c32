"""The pipeline end to end: official SDK → proxy under uvicorn → simulated upstream, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import logging

import httpx
import openai
import pytest
from conftest import ProxyServer

from proxy.sim import Reply, Simulator

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(client: openai.OpenAI, model: str = "o3", **kwargs: object) -> openai.APIResponse:  # type: ignore[type-arg]
    return client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kwargs)  # type: ignore[arg-type]


# -- injection -----------------------------------------------------------------------------------------


def test_chat_is_sent_on_flex_and_says_so(proxy: ProxyServer, sim: Simulator) -> None:
    raw = chat(proxy.client())
    answer = raw.parse()
    assert answer.service_tier == "flex"
    assert raw.headers["x-flex-served-tier"] == "flex"
    assert raw.headers["x-flex-attempts"] == "1"
    assert raw.headers["x-request-id"].startswith("req_")
    assert "openai-processing-ms" in raw.headers and "x-ratelimit-remaining-requests" in raw.headers
    assert sim.requests[-1].tier == "flex"
    assert sim.requests[-1].headers["authorization"] == "Bearer sk-client"


@pytest.mark.parametrize("path", ["/responses", "/responses/compact"])
def test_responses_endpoints_are_sent_on_flex(proxy: ProxyServer, sim: Simulator, path: str) -> None:
    body = {"model": "o3", "input": "hi"}
    response = httpx.post(proxy.base_url + path, json=body, headers={"authorization": "Bearer k"})
    assert response.status_code == 200
    assert sim.requests[-1].path == "/v1" + path
    assert sim.requests[-1].tier == "flex"


def test_responses_via_sdk(proxy: ProxyServer, sim: Simulator) -> None:
    response = proxy.client().responses.create(model="o3-2025-04-16", input="hi")
    assert response.service_tier == "flex"
    assert response.output_text
    assert sim.requests[-1].tier == "flex"


def test_body_reaches_upstream_byte_for_byte(proxy: ProxyServer, sim: Simulator) -> None:
    body = (
        b'{ "model" : "o3",\n "messages": [{"role":"user","content":"h\xc3\xa9llo \\u00e9 \\ud83d\\ude00"}],'
        b' "seed": 123456789012345678901234567890, "temperature": 1.50, "x_unknown": {"a": [1e5, null]} }'
    )
    response = httpx.post(proxy.base_url + "/chat/completions", content=body, headers={"authorization": "Bearer k"})
    assert response.status_code == 200
    assert sim.requests[-1].body == b'{"service_tier":"flex", "model" : "o3",' + body[len(b'{ "model" : "o3",') :]


@pytest.mark.parametrize(
    ("model", "client_tier", "header", "sent"),
    [
        ("gpt-4.1", None, None, None),  # not flex-capable: untouched
        ("gpt-5-2025-08-07", None, None, "flex"),  # dated snapshot of a flex family
        ("o3", "priority", None, "priority"),  # the client's own tier is respected
        ("o3", "auto", None, "auto"),
        ("o3", None, "off", None),  # per-request opt-out
        ("o3", "priority", "off", "priority"),
        ("gpt-4.1", None, "flex", "flex"),  # per-request force
        ("o3", "priority", "flex", "flex"),
    ],
)
def test_injection_rules(
    proxy: ProxyServer, sim: Simulator, model: str, client_tier: str | None, header: str | None, sent: str | None
) -> None:
    sim.options = type(sim.options)(flex_models=("*",))  # accept flex for any model, to see what was sent
    body: dict[str, object] = {"model": model, "messages": MESSAGES}
    if client_tier:
        body["service_tier"] = client_tier
    headers = {"authorization": "Bearer k"} | ({"x-flex-tier": header} if header else {})
    response = httpx.post(proxy.base_url + "/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    assert sim.requests[-1].tier == sent
    assert not any(name.startswith("x-flex") for name in sim.requests[-1].headers)


def test_operator_can_override_client_tier(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(override_client_tier=True)
    chat(proxy.client(), service_tier="priority")
    assert sim.requests[-1].tier == "flex"


def test_background_requests_are_not_put_on_flex(proxy: ProxyServer, sim: Simulator) -> None:
    httpx.post(
        proxy.base_url + "/responses",
        json={"model": "o3", "input": "hi", "background": True, "store": True},
        headers={"authorization": "Bearer k"},
    )
    assert sim.requests[-1].tier is None


# -- pass-through ----------------------------------------------------------------------------------------


def test_other_endpoints_pass_through(proxy: ProxyServer, sim: Simulator) -> None:
    client = proxy.client()
    assert any(m.id == "o3" for m in client.models.list().data)
    embedding = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(embedding.data[0].embedding) > 0
    stored = client.responses.create(model="o3", input="keep me")
    assert client.responses.retrieve(stored.id).id == stored.id
    uploaded = client.files.create(file=("notes.jsonl", b'{"a": 1}\n' * 1000), purpose="batch")
    assert uploaded.bytes == 9000
    assert client.files.content(uploaded.id).content == b'{"a": 1}\n' * 1000
    assert sim.requests[-1].path == f"/v1/files/{uploaded.id}/content"


def test_unknown_paths_and_methods_pass_through_with_query(proxy: ProxyServer, sim: Simulator) -> None:
    response = httpx.delete(proxy.base_url + "/batches/b_1?x=1&y=%2F", headers={"authorization": "Bearer k"})
    assert response.json()["echo"]["method"] == "DELETE"
    seen = sim.requests[-1]
    assert (seen.method, seen.path, seen.query) == ("DELETE", "/v1/batches/b_1", "x=1&y=%2F")
    listed = httpx.get(proxy.base_url + "/chat/completions?limit=2", headers={"authorization": "Bearer k"})
    assert listed.json()["echo"]["method"] == "GET"


def test_healthz(proxy: ProxyServer) -> None:
    response = httpx.get(proxy.url + "/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


# -- when flex is unavailable ------------------------------------------------------------------------------


def test_default_strategy_backs_off_then_answers_on_flex(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(kind="flex_429"), Reply(kind="flex_429"))
    raw = chat(proxy.client())
    assert raw.http_response.status_code == 200
    assert raw.headers["x-flex-attempts"] == "3"
    assert raw.headers["x-flex-served-tier"] == "flex"
    assert [r.tier for r in sim.requests] == ["flex", "flex", "flex"]
    assert proxy.metric("flexproxy_retries_total", reason="flex_unavailable") == 2


def test_default_strategy_falls_back_to_standard(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(max_flex_attempts=3, flex_gate=False)  # each request backs off on its own
    sim.script(*[Reply(kind="flex_429")] * 3)
    raw = chat(proxy.client())
    assert raw.parse().service_tier == "default"
    assert raw.headers["x-flex-attempts"] == "4"
    assert raw.headers["x-flex-served-tier"] == "default"
    assert [r.tier for r in sim.requests] == ["flex", "flex", "flex", "auto"]
    assert proxy.metric("flexproxy_fallbacks_total", model="o3") == 1


def test_standard_strategy_resends_at_once(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(on_unavailable="standard", standard_tier="omit")
    sim.script(Reply(kind="flex_429"))
    raw = chat(proxy.client())
    assert raw.headers["x-flex-attempts"] == "2"
    assert [r.tier for r in sim.requests] == ["flex", None]
    assert b"service_tier" not in sim.requests[-1].body


def test_backoff_strategy_gives_up_with_a_429_the_sdk_will_not_retry(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(on_unavailable="backoff", max_flex_attempts=3, flex_gate=False)
    sim.script(*[Reply(kind="flex_429")] * 5)
    with pytest.raises(openai.RateLimitError) as caught:
        proxy.client(max_retries=2).chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    headers = caught.value.response.headers
    assert headers["x-should-retry"] == "false"
    assert float(headers["retry-after"]) >= 1
    assert headers["x-flex-attempts"] == "3"
    assert len(sim.requests) == 3  # the SDK's own retries did not multiply ours
    assert caught.value.code == "resource_unavailable"


def test_fail_strategy_returns_the_429_as_it_came(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(on_unavailable="fail")
    sim.script(Reply(kind="flex_429", retry_after_ms=1500))
    with pytest.raises(openai.RateLimitError) as caught:
        chat(proxy.client())
    headers = caught.value.response.headers
    assert "retry-after-ms" not in headers  # one retry-after, in whole seconds, not two that may disagree
    assert headers.get_list("retry-after") == ["2"]
    assert headers.get_list("x-should-retry") == ["false"]
    assert caught.value.code == "resource_unavailable"  # upstream's own body, as it came
    assert len(sim.requests) == 1


@pytest.mark.parametrize(("header", "tiers"), [("fail", ["flex"]), ("standard", ["flex", "auto"])])
def test_strategy_per_request_header(proxy: ProxyServer, sim: Simulator, header: str, tiers: list[str]) -> None:
    sim.script(Reply(kind="flex_429"))
    with contextlib.suppress(openai.RateLimitError):
        chat(proxy.client(default_headers={"X-Flex-On-Unavailable": header}))
    assert [r.tier for r in sim.requests] == tiers


def test_rate_limit_is_retried_after_its_wait_on_the_same_tier(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(kind="rate_limit_429", retry_after_ms=300))
    raw = chat(proxy.client())
    assert raw.headers["x-flex-served-tier"] == "flex"
    assert [r.tier for r in sim.requests] == ["flex", "flex"]
    assert proxy.metric("flexproxy_retries_total", reason="rate_limited") == 1
    assert proxy.metric("flexproxy_backoff_wait_seconds_sum") >= 0.29  # the wait that happened (timers wake early)
    assert proxy.metric("flexproxy_fallbacks_total") == 0


def test_quota_429_is_never_retried(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(kind="quota_429"))
    with pytest.raises(openai.RateLimitError) as caught:
        chat(proxy.client())
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(sim.requests) == 1


def test_tier_rejection_resends_without_the_tier(proxy: ProxyServer, sim: Simulator) -> None:
    raw = chat(proxy.client(), model="gpt-4.1", extra_headers={"x-flex-tier": "flex"})
    assert raw.http_response.status_code == 200
    assert [r.tier for r in sim.requests] == ["flex", None]
    assert proxy.metric("flexproxy_tier_rejections_total") == 1


def test_tier_the_client_chose_is_not_silently_dropped(proxy: ProxyServer, sim: Simulator) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(proxy.client(), model="gpt-4.1", service_tier="flex")
    assert caught.value.param == "service_tier"
    assert len(sim.requests) == 1


@pytest.mark.parametrize("reply", [Reply(kind="server_error", status=503), Reply(kind="drop")])
def test_server_errors_and_dropped_connections_are_retried(proxy: ProxyServer, sim: Simulator, reply: Reply) -> None:
    sim.script(reply)
    raw = chat(proxy.client())
    assert raw.http_response.status_code == 200
    assert raw.headers["x-flex-attempts"] == "2"


def test_client_deadline_makes_the_proxy_fall_back_early(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    # Flex back-off could take a minute; the client gives up after 10 s, so the proxy goes to standard at once.
    # Jitter fixed at half: the flex retry would wait 15 s, past the 4.5 s left before the standard reserve.
    # Without the gate: with it, the request waits in the gate until its flex deadline (tests/test_gate.py).
    proxy = make_proxy(backoff_initial_s=30, backoff_max_s=60, standard_reserve_s=5, rand=lambda: 0.5,
                       flex_gate=False)  # fmt: skip
    sim.script(Reply(kind="flex_429"))
    raw = chat(proxy.client(timeout=10))
    assert raw.headers["x-flex-served-tier"] == "default"
    assert [r.tier for r in sim.requests] == ["flex", "auto"]
    assert proxy.metric("flexproxy_backoff_wait_seconds_sum") == 0


# -- streaming -----------------------------------------------------------------------------------------------


def test_chat_stream_without_usage_hides_the_usage_the_proxy_asked_for(proxy: ProxyServer, sim: Simulator) -> None:
    chunks = list(proxy.client().chat.completions.create(model="o3", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    assert json.loads(sim.requests[-1].body)["stream_options"] == {"include_usage": True}
    assert proxy.metric("flexproxy_tokens_total", model="o3", tier="flex", kind="output") == 20


def test_chat_stream_with_usage_keeps_it(proxy: ProxyServer, sim: Simulator) -> None:
    chunks = list(
        proxy.client().chat.completions.create(
            model="o3", messages=MESSAGES, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20


def test_responses_stream(proxy: ProxyServer, sim: Simulator) -> None:
    events = list(proxy.client().responses.create(model="o3", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.service_tier == "flex"  # type: ignore[union-attr]


def test_stream_falls_back_before_the_first_byte(proxy: ProxyServer, sim: Simulator) -> None:
    # A 429, then a 200 stream whose first event is a flex error: both are retried, nothing was sent yet.
    sim.script(Reply(kind="flex_429"), Reply(kind="stream_error"))
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="o3", messages=MESSAGES, stream=True  # type: ignore[arg-type]
    )
    assert raw.headers["x-flex-attempts"] == "3"
    assert [chunk.service_tier for chunk in raw.parse()][-1] == "flex"


def test_stream_cut_ends_with_an_error_event_not_a_silent_success(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(kind="cut_stream", events=3))
    stream = proxy.client().chat.completions.create(model="o3", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert 1 <= len(received) <= 4
    assert len(sim.requests) == 1  # no retry once bytes reached the client
    assert proxy.metric("flexproxy_requests_total", outcome="stream_cut") == 1


def test_responses_stream_cut_ends_with_error_event(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(kind="cut_stream", events=2))
    events = list(proxy.client().responses.create(model="o3", input="hi", stream=True))
    assert events[-1].type == "error"  # the SDK's typed error event, not a response.completed
    assert events[-1].code == "upstream_incomplete"  # type: ignore[union-attr]
    assert events[-1].sequence_number == events[-2].sequence_number + 1


def test_stream_is_relayed_as_it_arrives(proxy: ProxyServer, sim: Simulator) -> None:
    import time

    sim.script(Reply(kind="ok", events=4, event_interval_s=0.5))
    start = time.monotonic()
    stream = proxy.client().chat.completions.create(model="o3", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    first = next(iter(stream))
    first_at = time.monotonic() - start
    rest = list(stream)
    total = time.monotonic() - start
    assert first.choices and rest
    assert first_at < total - 1.0  # the first chunk came long before the stream ended: nothing buffered


# -- faults and bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"model": "o3", "messages": [', 400, "could not parse"),
        (b"[1, 2]", 400, "JSON object"),
        (b"\xff\xfe", 400, "UTF-8"),
    ],
)
def test_bad_bodies_get_openai_shaped_errors(proxy: ProxyServer, body: bytes, status: int, fragment: str) -> None:
    response = httpx.post(proxy.base_url + "/chat/completions", content=body, headers={"authorization": "Bearer k"})
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(proxy.url + "/healthz").status_code == 200  # and the proxy keeps serving


def test_bad_header_values_are_client_errors(proxy: ProxyServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(proxy.client(default_headers={"X-Flex-On-Unavailable": "pray"}))
    assert caught.value.param == "X-Flex-On-Unavailable"


def test_oversized_body_is_refused(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(max_body_mb=1.5)
    with pytest.raises(openai.APIStatusError) as caught:
        proxy.client().chat.completions.create(model="o3", messages=[{"role": "user", "content": "x" * 2_000_000}])
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"
    # The limit in the unit it is set in, and the setting that raises it.
    assert caught.value.message.endswith("larger than this proxy's limit of 1.5 MiB (FLEX_PROXY_MAX_BODY_MB).")
    declared = httpx.post(proxy.base_url + "/chat/completions", content=b"{" * (2 * 1024 * 1024),
                          headers={"authorization": "Bearer k"})  # fmt: skip
    assert declared.status_code == 413 and "1.5 MiB (FLEX_PROXY_MAX_BODY_MB)" in declared.json()["error"]["message"]
    assert sim.requests == []


def test_errors_the_proxy_makes_carry_a_request_id_its_log_line_repeats(
    make_proxy, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(max_body_mb=1)
    down = make_proxy(upstream_base_url="http://127.0.0.1:9/v1", max_retries=0)
    with caplog.at_level(logging.INFO, logger="flex_proxy"):
        key = {"authorization": "Bearer k"}
        answers = {
            "bad_request": httpx.post(proxy.base_url + "/chat/completions", content=b"{", headers=key),
            "too_large": httpx.post(proxy.base_url + "/responses", content=b"x" * 2_000_000),
            "invalid_path": httpx.get(proxy.base_url + "/files/%2e%2e/models"),
            "unreachable": httpx.post(down.base_url + "/chat/completions", json={"model": "o3", "messages": MESSAGES}),
            "passthrough_unreachable": httpx.get(down.base_url + "/models"),
        }
        unknown = {"model": "no-such-model", "messages": MESSAGES}
        upstreams_own = httpx.post(proxy.base_url + "/chat/completions", json=unknown)
    lines = [r.fields for r in caplog.records if r.name == "flex_proxy.access"]  # type: ignore[attr-defined]
    ids = set()
    for what, answer in answers.items():
        assert answer.status_code >= 400 and answer.headers["x-should-retry"] == "false", what
        request_id = answer.headers["x-request-id"]
        assert request_id.startswith("req_flexproxy_") and len(request_id) == len("req_flexproxy_") + 24, what
        (line,) = [line for line in lines if line.get("request_id") == request_id]
        assert line["status"] == answer.status_code and "upstream_request_id" not in line, what
        ids.add(request_id)
    assert len(ids) == len(answers), "a new id for each error"
    # An error upstream made keeps upstream's own id, under its own name in the log.
    assert upstreams_own.status_code == 404
    theirs = upstreams_own.headers["x-request-id"]
    assert theirs.startswith("req_") and not theirs.startswith("req_flexproxy_")
    (line,) = [line for line in lines if line.get("upstream_request_id") == theirs]
    assert "request_id" not in line


def test_eight_megabyte_body_goes_through(proxy: ProxyServer, sim: Simulator) -> None:
    content = "é" * 4_000_000  # 8 MB of UTF-8
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="o3", messages=[{"role": "user", "content": content}]
    )
    assert raw.http_response.status_code == 200
    assert json.loads(sim.requests[-1].body)["messages"][0]["content"] == content


def test_unknown_model_gets_upstreams_404(proxy: ProxyServer, sim: Simulator) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        chat(proxy.client(), model="no-such-model")
    assert caught.value.code == "model_not_found"


def test_upstream_down_is_a_502(make_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(upstream_base_url="http://127.0.0.1:9/v1", max_retries=1)
    with pytest.raises(openai.APIStatusError) as caught:
        chat(proxy.client())
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"
    assert caught.value.response.headers["x-flex-attempts"] == "2"
    assert httpx.get(proxy.url + "/healthz").status_code == 200


def test_upstream_hanging_is_a_504(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(upstream_timeout_s=0.5, max_retries=0)
    sim.script(Reply(kind="hang", delay_s=30))
    with pytest.raises(openai.APIStatusError) as caught:
        chat(proxy.client())
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
