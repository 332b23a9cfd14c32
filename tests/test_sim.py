"""The simulated upstream on a real loopback port, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import openai
import pytest
import rawup
from rawup import RawRequest, RawUpstream

from proxy.sim import Reply, SimOptions, SimServer, Simulator
from proxy.sim.cli import main as sim_main
from proxy.sim.options import SEPARATORS, Canned, periodic_busy, window_busy
from proxy.sim.recorded import leaves_v1

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Say hello."}]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def server() -> Iterator[SimServer]:
    with SimServer(Simulator()) as running:
        yield running


@pytest.fixture
def sim(server: SimServer) -> Iterator[Simulator]:
    server.sim.options = SimOptions()
    server.sim.reset()
    yield server.sim
    server.sim.reset()


@pytest.fixture
def client(server: SimServer, sim: Simulator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


def sse_lines(server: SimServer, path: str, body: dict[str, object]) -> list[str]:
    """The raw `data:`/`event:` lines of a stream, to check framing the SDK would hide."""
    with httpx.stream("POST", server.base_url + path, json=body, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


# -- chat completions --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "served"),
    [("flex", "flex"), (None, "default"), ("auto", "default"), ("priority", "priority"), ("fast", "priority")],
)
def test_chat_reports_the_served_tier(
    client: openai.OpenAI, sim: Simulator, requested: str | None, served: str
) -> None:
    extra = {"service_tier": requested} if requested else {}
    completion = client.chat.completions.create(model="o3", messages=MESSAGES, **extra)  # type: ignore[call-overload]
    assert completion.service_tier == served
    assert completion.model == "o3"
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "This is a simulated reply from the upstream."
    assert completion.choices[0].finish_reason == "stop"
    assert sim.requests[-1].served_tier == served
    assert sim.stats()[f"served_{served}"] == 1


def test_chat_usage_follows_the_options(client: openai.OpenAI, sim: Simulator) -> None:
    sim.options = SimOptions(cached_share=0.5, completion_tokens=30, reasoning_tokens=12)
    completion = client.chat.completions.create(model="gpt-5", messages=MESSAGES)
    usage = completion.usage
    assert usage is not None
    prompt = len(sim.requests[-1].body) // 4
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, 30, prompt + 30)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == prompt // 2
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 12


def test_scripted_usage_overrides_the_computed_one(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply(usage={"input": 1000, "cached": 600, "output": 50, "reasoning": 40}))
    usage = client.chat.completions.create(model="o3", messages=MESSAGES).usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1000, 50, 1050)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 600


def test_chat_stream_without_usage_has_no_usage_field(server: SimServer, sim: Simulator) -> None:
    lines = sse_lines(
        server, "/chat/completions", {"model": "o3", "messages": MESSAGES, "stream": True, "service_tier": "flex"}
    )
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert len(chunks) == 1 + 8 + 1  # role, eight deltas, finish
    assert all("usage" not in chunk and chunk["service_tier"] == "flex" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_with_usage_ends_with_a_usage_chunk(client: openai.OpenAI, sim: Simulator) -> None:
    stream = client.chat.completions.create(
        model="o4-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert [chunk.usage for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert text == "This is a simulated reply from the upstream."
    assert {chunk.service_tier for chunk in chunks} == {"default"}


def test_scripted_events_and_interval_shape_the_stream(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply(events=3, event_interval_s=0.05))
    started = time.monotonic()
    deltas = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(model="o3", messages=MESSAGES, stream=True)
        if c.choices and c.choices[0].delta.content
    ]
    assert deltas == ["This", " is", " a"]
    assert time.monotonic() - started >= 0.2  # four gaps between five events


# -- responses ---------------------------------------------------------------------------------------------


def test_responses_non_stream_and_retrieve(client: openai.OpenAI, sim: Simulator) -> None:
    sim.options = SimOptions(cached_share=0.25, reasoning_tokens=7)
    response = client.responses.create(model="gpt-5-mini", input="Say hello.", service_tier="flex")
    assert response.id.startswith("resp_")
    assert (response.status, response.service_tier, response.model) == ("completed", "flex", "gpt-5-mini")
    assert response.output_text == "This is a simulated reply from the upstream."
    assert response.usage is not None
    prompt = len(sim.requests[-1].body) // 4
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, 20)
    assert response.usage.input_tokens_details.cached_tokens == prompt // 4
    assert response.usage.output_tokens_details.reasoning_tokens == 7
    assert response.usage.total_tokens == prompt + 20
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_responses_stream_events_in_order(client: openai.OpenAI, sim: Simulator) -> None:
    events = list(client.responses.create(model="o3", input="Say hello.", service_tier="flex", stream=True))
    types = [event.type for event in events]
    assert types == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 8,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[0].response.service_tier == "flex"
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.service_tier == "flex"
    assert completed.response.usage is not None and completed.response.usage.output_tokens == 20
    assert client.responses.retrieve(completed.response.id).status == "completed"


def test_responses_stream_opening_events_echo_the_requested_tier(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply(served_tier="default"))
    events = list(client.responses.create(model="o3", input="x", stream=True))
    assert events[0].type == "response.created" and events[0].response.service_tier == "auto"
    assert events[-1].type == "response.completed" and events[-1].response.service_tier == "default"


def test_responses_compact(client: openai.OpenAI, sim: Simulator) -> None:
    compacted = client.responses.compact(model="gpt-5", input="a long conversation")
    assert compacted.object == "response.compaction"
    assert compacted.output[0].type == "compaction"
    assert compacted.usage.output_tokens == 20
    assert sim.requests[-1].path == "/v1/responses/compact"


# -- errors ------------------------------------------------------------------------------------------------


def test_flex_429_is_a_rate_limit_error_with_its_code(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("flex_429"))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
    error = caught.value
    assert error.status_code == 429
    assert (error.code, error.type) == ("resource_unavailable", "server_error")
    assert isinstance(error.body, dict) and error.body["message"].startswith("Resource Unavailable")
    assert "retry-after-ms" not in error.response.headers
    assert re.fullmatch(r"req_[0-9a-f]{32}", error.response.headers["x-request-id"])
    assert sim.stats()["flex_429"] == 1 and sim.requests[-1].outcome == "flex_429"


def test_rate_limit_429_carries_retry_headers(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("rate_limit_429"), Reply("rate_limit_429", retry_after_ms=1500, retry_after_s=2))
    with pytest.raises(openai.RateLimitError) as first:
        client.chat.completions.create(model="o3", messages=MESSAGES)
    assert first.value.code == "rate_limit_exceeded" and first.value.type == "requests"
    assert "Rate limit reached for o3" in first.value.message and "200ms" in first.value.message
    headers = first.value.response.headers
    assert (headers["retry-after-ms"], headers["x-ratelimit-remaining-requests"]) == ("200", "0")
    with pytest.raises(openai.RateLimitError) as second:
        client.chat.completions.create(model="o3", messages=MESSAGES)
    assert (second.value.response.headers["retry-after-ms"], second.value.response.headers["retry-after"]) == (
        "1500", "2")  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "exception", "status", "code"),
    [
        (Reply("quota_429"), openai.RateLimitError, 429, "insufficient_quota"),
        (Reply("tier_400"), openai.BadRequestError, 400, "invalid_value"),
        (Reply("server_error"), openai.InternalServerError, 500, None),
        (Reply("server_error", status=503), openai.InternalServerError, 503, "server_is_overloaded"),
    ],
)
def test_scripted_errors(
    client: openai.OpenAI,
    sim: Simulator,
    reply: Reply,
    exception: type[openai.APIStatusError],
    status: int,
    code: str | None,
) -> None:
    sim.script(reply)
    with pytest.raises(exception) as caught:
        client.responses.create(model="o3", input="x")
    assert (caught.value.status_code, caught.value.code) == (status, code)


def test_flex_on_a_model_without_flex_is_a_400_on_service_tier(client: openai.OpenAI, sim: Simulator) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, service_tier="flex")
    assert caught.value.param == "service_tier"
    assert "flex is not supported" in caught.value.message
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).service_tier == "default"
    assert [r.outcome for r in sim.requests] == ["tier_400", "ok"]


def test_unknown_model_is_a_404(client: openai.OpenAI, sim: Simulator) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert "no-such-model" in caught.value.message


def test_malformed_json_is_an_openai_shaped_400(server: SimServer, sim: Simulator) -> None:
    response = httpx.post(server.base_url + "/chat/completions", content=b"{not json", timeout=5)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["openai-version"] == "2020-10-01"
    assert sim.requests[-1].json is None


def test_api_key_is_checked_when_set(server: SimServer, sim: Simulator) -> None:
    sim.options = SimOptions(api_key="sk-right")
    wrong = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.code == "invalid_api_key"
    assert "sk-wrong" not in caught.value.message
    with openai.OpenAI(base_url=server.base_url, api_key="sk-right", max_retries=0) as right:
        assert right.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "default"


# -- broken connections and streams ------------------------------------------------------------------------


def test_drop_is_a_connection_error(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("drop"))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="o3", messages=MESSAGES)
    assert client.chat.completions.create(model="o3", messages=MESSAGES).choices[0].message.content


def test_cut_stream_sends_some_deltas_then_closes(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("cut_stream", events=3))
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="o3", messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert received == ["", "This", " is", " a"]


def test_cut_responses_stream_never_completes(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("cut_stream", events=20))
    types: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for event in client.responses.create(model="o3", input="x", stream=True):
            types.append(event.type)
    assert types.count("response.output_text.delta") == 20 and "response.completed" not in types


def test_cut_non_stream_sends_half_a_body(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("cut_stream"))
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(server.base_url + "/chat/completions", json={"model": "o3", "messages": MESSAGES}, timeout=5)


def test_stream_error_chat_raises_in_band(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("stream_error"))
    with pytest.raises(openai.APIError) as caught:
        list(client.chat.completions.create(model="o3", messages=MESSAGES, stream=True, service_tier="flex"))
    assert caught.value.code == "resource_unavailable"
    assert "Resource Unavailable" in caught.value.message


def test_stream_error_responses_is_an_error_event(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("stream_error"))
    lines = sse_lines(server, "/responses", {"model": "o3", "input": "x", "stream": True})
    assert lines[0] == "event: error"
    data = json.loads(lines[1].removeprefix("data: "))
    assert data == {
        "type": "error",
        "code": "resource_unavailable",
        "message": data["message"],
        "param": None,
        "sequence_number": 0,
    }
    assert len(lines) == 2


def test_hang_holds_until_the_client_gives_up(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("hang"))
    started = time.monotonic()
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=0.3) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model="o3", messages=MESSAGES)
        assert time.monotonic() - started < 2
        assert impatient.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "default"


def test_raw_body_and_extra_headers(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply(body=b"not json at all", status=502, headers={"X-Odd": "yes", "content-type": "text/plain"}))
    response = httpx.post(server.base_url + "/responses", json={"model": "o3"}, timeout=5)
    assert (response.status_code, response.text, response.headers["x-odd"]) == (502, "not json at all", "yes")
    assert response.headers["content-type"].startswith("text/plain")


def test_slow_replies_are_served_concurrently(server: SimServer, sim: Simulator) -> None:
    count, hold = 200, 1.0
    sim.script(*[Reply("slow", delay_s=hold)] * count)

    async def fire() -> list[int]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> int:
                async with session.post(server.base_url + "/chat/completions", json={"model": "o3"}) as response:
                    await response.read()
                    return response.status

            return await asyncio.gather(*[one() for _ in range(count)])

    started = time.monotonic()
    statuses = asyncio.run(fire())
    elapsed = time.monotonic() - started
    assert statuses == [200] * count
    assert hold <= elapsed < hold * 3


def test_latency_depends_on_the_served_tier(client: openai.OpenAI, sim: Simulator) -> None:
    sim.options = SimOptions(latency_standard_s=0.0, latency_flex_s=0.3)
    started = time.monotonic()
    client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
    flex_s = time.monotonic() - started
    started = time.monotonic()
    client.chat.completions.create(model="o3", messages=MESSAGES)
    standard_s = time.monotonic() - started
    assert flex_s >= 0.3 > standard_s


# -- capacity model and random shares ----------------------------------------------------------------------


def test_busy_windows_are_deterministic_and_near_the_share() -> None:
    for share in (0.1, 0.3, 0.7):
        busy = [window_busy(7, k, share) for k in range(1000)]
        assert busy == [window_busy(7, k, share) for k in range(1000)]
        assert abs(sum(busy) / 1000 - share) <= 0.05
    assert [window_busy(7, k, 0.5) for k in range(100)] != [window_busy(8, k, 0.5) for k in range(100)]
    assert not any(window_busy(1, k, 0.0) for k in range(1000))
    assert all(window_busy(1, k, 1.0) for k in range(1000))


def test_flex_busy_comes_in_bursts_on_a_fake_clock(server: SimServer, sim: Simulator) -> None:
    clock = FakeClock()
    sim_under_clock = Simulator(SimOptions(flex_busy_share=0.5, burst_s=5.0, seed=3), clock=clock)
    busy = [window_busy(3, k, 0.5) for k in range(50)]
    first_busy, first_free = busy.index(True), busy.index(False)
    with SimServer(sim_under_clock) as local, openai.OpenAI(base_url=local.base_url, api_key="k", max_retries=0) as sdk:
        for window, expect_busy in ((first_busy, True), (first_free, False)):
            outcomes = []
            for offset in (0.1, 2.5, 4.9):  # three requests spread over one window
                clock.now = 1000.0 + window * 5.0 + offset
                try:
                    sdk.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
                    outcomes.append("ok")
                except openai.RateLimitError as exc:
                    outcomes.append(str(exc.code))
            assert outcomes == (["resource_unavailable"] * 3 if expect_busy else ["ok"] * 3)
        clock.now = 1000.0 + first_busy * 5.0
        # A busy window refuses only flex: the standard tier still answers.
        assert sdk.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "default"
    assert sim_under_clock.stats()["flex_429"] == 3


def test_same_seed_gives_the_same_busy_windows() -> None:
    clocks = [FakeClock(), FakeClock()]
    sims = [Simulator(SimOptions(flex_busy_share=0.4, burst_s=2.0, seed=11), clock=c) for c in clocks]
    seen: list[list[bool]] = [[], []]
    for step in range(200):
        for clock, simulator, out in zip(clocks, sims, seen, strict=True):
            clock.now = 1000.0 + step * 0.7
            out.append(simulator.flex_busy())
    assert seen[0] == seen[1]
    assert 0.25 < sum(seen[0]) / 200 < 0.55


@pytest.mark.parametrize(
    ("elapsed", "busy"),
    [(0.0, True), (2.99, True), (3.0, False), (9.99, False), (10.0, True), (12.5, True), (13.0, False), (23.1, False)],
)
def test_periodic_busy_pattern_is_the_first_part_of_every_period(elapsed: float, busy: bool) -> None:
    assert periodic_busy(elapsed, 10.0, 3.0) is busy
    assert periodic_busy(elapsed, 0.0, 0.0) is False  # no period: never busy


def test_busy_period_counts_from_the_last_reset_and_is_set_over_http() -> None:
    clock = FakeClock()
    timed = Simulator(SimOptions(busy_period_s=10.0, busy_for_s=3.0), clock=clock)
    with SimServer(timed) as local, openai.OpenAI(base_url=local.base_url, api_key="k", max_retries=0) as sdk:
        # Set over /_sim/options like the benchmark does, then start the pattern with a reset at 1004.5.
        options = httpx.post(local.url + "/_sim/options", json={"busy_period_s": 10, "busy_for_s": 3}).json()
        assert (options["busy_period_s"], options["busy_for_s"]) == (10, 3)
        clock.now = 1004.5
        assert httpx.post(local.url + "/_sim/reset").json() == {"reset": True}
        outcomes = []
        for offset in (0.0, 2.9, 3.1, 9.9, 10.0, 12.0, 13.5):
            clock.now = 1004.5 + offset
            try:
                sdk.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
                outcomes.append("ok")
            except openai.RateLimitError as exc:
                outcomes.append(str(exc.code))
        busy = "resource_unavailable"
        assert outcomes == [busy, busy, "ok", "ok", busy, busy, "ok"]
        clock.now = 1004.5 + 1.0
        # The busy part refuses only flex: the standard tier still answers.
        assert sdk.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "default"
        bad = httpx.post(local.url + "/_sim/options", json={"busy_period_s": 2, "busy_for_s": 3})
        assert bad.status_code == 400 and "busy_for_s" in bad.json()["error"]["message"]
    assert timed.stats()["flex_429"] == 4


def test_busy_reject_share_zero_lets_flex_through(client: openai.OpenAI, sim: Simulator) -> None:
    sim.options = SimOptions(flex_busy_share=1.0, busy_reject_share=0.0)
    assert client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex").service_tier == "flex"


def test_rate_limit_and_error_shares(client: openai.OpenAI, sim: Simulator) -> None:
    sim.options = SimOptions(rate_limit_share=1.0, rate_limit_retry_ms=750)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert caught.value.response.headers["retry-after-ms"] == "750"
    sim.options = SimOptions(error_share=1.0)
    statuses = set()
    for _ in range(20):
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model="o3", messages=MESSAGES)
        statuses.add(error.value.status_code)
    assert statuses == {500, 503}


# -- recording ---------------------------------------------------------------------------------------------


def test_requests_are_recorded_in_order(client: openai.OpenAI, sim: Simulator) -> None:
    client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
    client.models.list()
    first, second = sim.requests
    assert (first.method, first.path, first.tier, first.json["model"]) == ("POST", "/v1/chat/completions", "flex", "o3")
    assert first.headers["authorization"] == "Bearer sk-test"
    assert all(name == name.lower() for name in first.headers)
    assert json.loads(first.body) == first.json
    assert (second.method, second.path, second.tier, second.outcome) == ("GET", "/v1/models", None, "models")
    assert sim.stats()["requests"] == 2 and sim.stats()["model_requests"] == 1


def test_scripted_replies_are_used_in_order_then_options_apply(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("flex_429"), Reply("ok", served_tier="default"))
    assert sim.pending == 2
    client.models.list()  # pass-through endpoints leave the script alone
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
    assert client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex").service_tier == (
        "default")  # fmt: skip
    assert client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex").service_tier == "flex"
    assert sim.pending == 0


def test_every_answer_carries_openai_headers(client: openai.OpenAI, sim: Simulator) -> None:
    raw = client.chat.completions.with_raw_response.create(model="o3", messages=MESSAGES)
    for name in (
        "openai-processing-ms",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ):
        assert raw.headers[name]
    assert raw.headers["x-ratelimit-reset-requests"] == "1s"
    assert raw.request_id is not None and re.fullmatch(r"req_[0-9a-f]{32}", raw.request_id)


# -- pass-through endpoints --------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI, sim: Simulator) -> None:
    ids = [model.id for model in client.models.list()]
    assert {"o3", "o4-mini", "gpt-5", "gpt-4o", "text-embedding-3-small"} <= set(ids)
    assert client.models.retrieve("gpt-5-mini").id == "gpt-5-mini"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("davinci-002")


def test_embeddings_are_deterministic_in_both_encodings(
    client: openai.OpenAI, server: SimServer, sim: Simulator
) -> None:
    sdk = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])  # SDK asks base64
    assert json.loads(sim.requests[-1].body)["encoding_format"] == "base64"
    assert [item.index for item in sdk.data] == [0, 1]
    assert len(sdk.data[0].embedding) == 16 and sdk.data[0].embedding != sdk.data[1].embedding
    assert sdk.usage.prompt_tokens == 2
    plain = httpx.post(
        server.base_url + "/embeddings",
        json={"model": "text-embedding-3-small", "input": "alpha", "encoding_format": "float", "dimensions": 4},
    )
    vector = plain.json()["data"][0]["embedding"]
    assert len(vector) == 4 and abs(sum(v * v for v in vector) - 1.0) < 1e-9
    again = client.embeddings.create(model="text-embedding-3-small", input="alpha")
    assert again.data[0].embedding == sdk.data[0].embedding


def test_embedding_base64_is_little_endian_float32(server: SimServer, sim: Simulator) -> None:
    body = {"model": "text-embedding-3-large", "input": "alpha", "dimensions": 4}
    floats = httpx.post(server.base_url + "/embeddings", json=body).json()["data"][0]["embedding"]
    encoded = httpx.post(server.base_url + "/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = struct.unpack("<4f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded == pytest.approx(floats, rel=1e-6)


def test_files_upload_and_content(client: openai.OpenAI, sim: Simulator) -> None:
    content = b'{"custom_id": "1"}\n' * 5000 + bytes(range(256))
    uploaded = client.files.create(file=("batch.jsonl", content), purpose="batch")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(content), "batch.jsonl", "batch")
    assert client.files.content(uploaded.id).content == content
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-missing")


def test_unknown_response_id_is_a_404(client: openai.OpenAI, sim: Simulator) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_missing")
    assert caught.value.type == "invalid_request_error"


def test_catch_all_echoes_the_request(server: SimServer, sim: Simulator) -> None:
    response = httpx.request(
        "PATCH",
        server.base_url + "/batches/b_1/cancel?x=1&y=%2F",
        content=b"12345",
        headers={"Authorization": "Bearer secret", "X-Custom": "v"},
    )
    echo = response.json()["echo"]
    assert (echo["method"], echo["path"], echo["query"], echo["body_bytes"]) == (
        "PATCH", "/v1/batches/b_1/cancel", "x=1&y=%2F", 5)  # fmt: skip
    assert echo["headers"]["authorization"] == "present" and echo["headers"]["x-custom"] == "v"
    anonymous = httpx.get(server.base_url + "/chat/completions").json()["echo"]
    assert (anonymous["method"], anonymous["headers"]["authorization"]) == ("GET", "absent")
    assert sim.requests[0].headers["authorization"] == "Bearer secret"


# -- control endpoints -------------------------------------------------------------------------------------


def test_control_endpoints_drive_an_out_of_process_simulator(
    client: openai.OpenAI, server: SimServer, sim: Simulator
) -> None:
    scripted = httpx.post(
        server.url + "/_sim/script",
        json=[{"kind": "flex_429", "retry_after_ms": 5}, {"kind": "ok", "body": '{"odd": true}'}],
    )
    assert scripted.json() == {"scripted": 2, "pending": 2}
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
    odd = httpx.post(server.base_url + "/chat/completions", json={"model": "o3"}).json()
    assert odd == {"odd": True}
    stats = httpx.get(server.url + "/_sim/stats").json()
    assert (stats["flex_429"], stats["model_requests"], stats["requested_flex"]) == (1, 2, 1)
    recorded = httpx.get(server.url + "/_sim/requests", params={"limit": 1}).json()
    assert len(recorded) == 1 and recorded[0]["model"] == "o3" and "body" not in recorded[0]
    bad = httpx.post(server.url + "/_sim/script", json=[{"kind": "nonsense"}])
    assert bad.status_code == 400 and "nonsense" in bad.json()["error"]["message"]
    options = httpx.post(server.url + "/_sim/options", json={"flex_busy_share": 0.5, "flex_models": ["o3*"]})
    assert options.json()["flex_busy_share"] == 0.5 and sim.options.flex_models == ("o3*",)
    assert httpx.post(server.url + "/_sim/options", json={"flex_busy_share": 5}).status_code == 400
    assert httpx.post(server.url + "/_sim/reset").json() == {"reset": True}
    assert sim.requests == [] and sim.stats()["model_requests"] == 0


# -- faults for the fault suite ----------------------------------------------------------------------------

USAGE = {"input": 100, "cached": 40, "output": 10, "reasoning": 3}


def chat_body(**extra: object) -> dict[str, object]:
    return {"model": "o3", "messages": MESSAGES, **extra}


def exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw request bytes and read until the server closes; a reset surfaces as ConnectionResetError."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


def raw_post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


def data_lines(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_reset_is_an_rst_before_any_byte_and_refused_work(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("reset"))
    with pytest.raises(ConnectionResetError):
        exchange(server.port, raw_post("/v1/chat/completions", json.dumps(chat_body()).encode()))
    recorded = sim.requests[-1]
    assert recorded.finished.is_set() and not recorded.closed_by_peer.is_set()
    assert recorded.accepted is False and recorded.json["model"] == "o3"  # the request was read first
    billing = sim.billing()
    assert (billing.accepted, billing.refused) == (0, 1)


def test_reset_through_the_sdk_is_a_connection_error(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("reset"))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="o3", messages=MESSAGES)
    assert client.chat.completions.create(model="o3", messages=MESSAGES).choices[0].message.content


def test_reset_after_a_silence_is_accepted_work(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("reset", delay_s=30, usage=USAGE))
    request = raw_post("/v1/chat/completions", json.dumps(chat_body(service_tier="flex")).encode())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(exchange, server.port, request)
        assert sim.wait_for(lambda: sim.hanging == 1)
        assert sim.release_hangs() == 1
        with pytest.raises(ConnectionResetError):
            answer.result(timeout=5)
    assert sim.settle()
    billing = sim.billing()
    assert (billing.accepted, billing.refused, billing.delivered, billing.undelivered) == (1, 0, 0, 1)
    assert billing.accepted_tokens == {"flex": USAGE} and billing.delivered_tokens == {}


def test_hang_ends_when_released_and_closes_without_an_answer(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("hang"))  # an hour, unless released
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, server.base_url + "/chat/completions", json=chat_body(), timeout=10)
        assert sim.wait_for(lambda: sim.hanging == 1)
        assert sim.release_hangs() == 1
        with pytest.raises(httpx.RemoteProtocolError):
            answer.result(timeout=5)
    recorded = sim.requests[-1]
    assert recorded.finished.wait(5) and not recorded.closed_by_peer.is_set()
    assert recorded.accepted is True and sim.hanging == 0
    assert sim.release_hangs() == 0  # nothing left to release


def test_a_client_leaving_during_a_hang_is_seen_upstream(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("hang"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/chat/completions", json=chat_body(), timeout=0.3)
    recorded = sim.requests[-1]
    assert recorded.closed_by_peer.wait(5) and recorded.ended.is_set()
    assert not recorded.finished.is_set()
    assert recorded.ended_at is not None and recorded.ended_at - recorded.received_at >= 0.25
    assert sim.wait_for(lambda: sim.hanging == 0)
    assert sim.requests[-1].summary()["closed_by_peer"] is True


def test_stall_goes_silent_after_some_deltas_then_finishes(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("stall", events=2))
    lines: list[str] = []
    with httpx.stream("POST", server.base_url + "/chat/completions", json=chat_body(stream=True), timeout=10) as r:
        received = r.iter_lines()
        for line in received:
            lines.append(line)
            if len(data_lines(lines)) == 3:  # the role chunk and two deltas
                break
        assert sim.wait_for(lambda: sim.hanging == 1)
        assert not sim.requests[-1].ended.is_set()
        assert sim.release_hangs() == 1
        lines.extend(received)
    chunks = [json.loads(data) for data in data_lines(lines)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
        "This is a simulated reply from the upstream.")  # fmt: skip
    assert data_lines(lines)[-1] == "[DONE]"
    assert sim.requests[-1].finished.wait(5) and sim.requests[-1].outcome == "stall"


def test_stall_for_a_while_on_responses(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("stall", events=1, delay_s=0.3))
    arrivals: list[tuple[str, float]] = []
    for event in client.responses.create(model="o3", input="x", stream=True):
        arrivals.append((event.type, time.monotonic()))
    types = [name for name, _ in arrivals]
    first_delta = types.index("response.output_text.delta")
    assert arrivals[first_delta + 1][1] - arrivals[first_delta][1] >= 0.25  # asyncio timers may fire a little early
    assert types.count("response.output_text.delta") == 8 and types[-1] == "response.completed"


def test_a_client_leaving_a_stalled_stream_is_seen_upstream(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("stall", events=1))
    with httpx.stream("POST", server.base_url + "/chat/completions", json=chat_body(stream=True), timeout=10) as r:
        assert r.status_code == 200
        assert sim.wait_for(lambda: sim.hanging == 1)
    recorded = sim.requests[-1]
    assert recorded.closed_by_peer.wait(5) and not recorded.finished.is_set()
    assert sim.wait_for(lambda: sim.hanging == 0)


def test_a_client_leaving_mid_stream_is_seen_upstream(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply(event_interval_s=0.2, usage=USAGE))
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the first event, then leave
    recorded = sim.requests[-1]
    assert recorded.closed_by_peer.wait(5) and not recorded.finished.is_set()
    assert recorded.accepted is True and not recorded.delivered  # billed, though its usage never went out
    assert sim.settle() and sim.billing().undelivered == 1


def test_the_server_comes_back_on_the_same_port() -> None:
    first = SimServer().start()
    port = first.port
    first.stop()
    with pytest.raises(httpx.ConnectError):  # upstream down: nothing listens
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
    with SimServer(first.sim, port=port) as again:
        assert httpx.get(again.base_url + "/models", timeout=5).status_code == 200


def test_slow_first_token_sends_headers_at_once(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("slow_first_token", delay_s=30))
    with httpx.stream("POST", server.base_url + "/responses", json={"model": "o3", "input": "x", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert sim.wait_for(lambda: sim.hanging == 1)
    # The client left before the first event: upstream sees the connection close.
    recorded = sim.requests[-1]
    assert recorded.closed_by_peer.wait(5) and not recorded.finished.is_set()
    assert recorded.accepted is True and not recorded.delivered


def test_slow_first_token_released_is_a_whole_stream(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("slow_first_token", delay_s=30))
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as sdk,
    ):
        stream = sdk.chat.completions.create(model="o3", messages=MESSAGES, stream=True)  # headers are in
        assert sim.wait_for(lambda: sim.hanging == 1)
        chunks = pool.submit(list, stream)
        assert sim.release_hangs() == 1
        text = "".join(c.choices[0].delta.content or "" for c in chunks.result(timeout=5) if c.choices)
    assert text == "This is a simulated reply from the upstream."


def test_slow_first_token_without_stream_delays_the_headers(client: openai.OpenAI, sim: Simulator) -> None:
    sim.script(Reply("slow_first_token", delay_s=0.3))
    started = time.monotonic()
    completion = client.chat.completions.create(model="o3", messages=MESSAGES)
    assert time.monotonic() - started >= 0.3
    assert completion.choices[0].message.content == "This is a simulated reply from the upstream."


@pytest.mark.parametrize(
    ("path", "body"),
    [("/chat/completions", chat_body(stream=True)), ("/responses", {"model": "o3", "input": "x", "stream": True})],
)
def test_malformed_event_sits_in_a_stream_that_ends_normally(
    server: SimServer, sim: Simulator, path: str, body: dict[str, object]
) -> None:
    sim.script(Reply("malformed_event"))
    data = data_lines(sse_lines(server, path, body))

    def parses(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return text == "[DONE]"
        return True

    broken = [index for index, text in enumerate(data) if not parses(text)]
    assert len(broken) == 1 and 2 < broken[0] < len(data) - 3
    last = data[-1] if path == "/responses" else data[-2]
    assert "usage" not in json.loads(last) or path == "/responses"
    if path == "/responses":
        assert json.loads(last)["type"] == "response.completed"
    else:
        assert data[-1] == "[DONE]"
    assert sim.settle() and sim.requests[-1].finished.is_set()


def test_no_done_is_a_complete_chat_stream_that_closes_cleanly(
    client: openai.OpenAI, server: SimServer, sim: Simulator
) -> None:
    sim.script(Reply("no_done"), Reply("no_done"))
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=10) as response:
        lines = [line for line in response.iter_lines() if line]
        assert response.headers["connection"] == "close"
    data = data_lines(lines)
    assert "[DONE]" not in data and len(data) == len(lines)
    finish, usage = json.loads(data[-2]), json.loads(data[-1])
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
    chunks = list(client.chat.completions.create(model="o3", messages=MESSAGES, stream=True))  # the SDK is content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert sim.settle() and [r.finished.is_set() for r in sim.requests] == [True, True]
    assert [r.delivered for r in sim.requests] == [True, False]  # no usage asked, none delivered


def test_prelude_then_error_on_responses(server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("prelude_then_error"))
    lines = sse_lines(server, "/responses", {"model": "o3", "input": "x", "stream": True, "service_tier": "flex"})
    assert [line for line in lines if not line.startswith("data: ")] == [
        "event: response.created", "event: response.in_progress", ": keepalive", "event: error"]  # fmt: skip
    events = [json.loads(data) for data in data_lines(lines)]
    assert [(e["type"], e["sequence_number"]) for e in events] == [
        ("response.created", 0), ("response.in_progress", 1), ("error", 2)]  # fmt: skip
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["service_tier"] == "flex"
    assert events[2]["code"] == "resource_unavailable"
    assert sim.settle() and sim.requests[-1].accepted is False and sim.billing().refused == 1


def test_prelude_then_error_on_chat(client: openai.OpenAI, server: SimServer, sim: Simulator) -> None:
    sim.script(Reply("prelude_then_error"), Reply("prelude_then_error"))
    lines = sse_lines(server, "/chat/completions", chat_body(stream=True))
    assert lines[0] == ": keepalive" and len(lines) == 2
    assert json.loads(lines[1].removeprefix("data: "))["error"]["code"] == "resource_unavailable"
    with pytest.raises(openai.APIError) as caught:
        list(client.chat.completions.create(model="o3", messages=MESSAGES, stream=True))
    assert caught.value.code == "resource_unavailable"


@pytest.mark.parametrize("separator", sorted(SEPARATORS))
def test_events_end_with_any_legal_boundary(
    client: openai.OpenAI, server: SimServer, sim: Simulator, separator: str
) -> None:
    sim.script(Reply(separator=separator), Reply(separator=separator), Reply(separator=separator))
    with httpx.stream("POST", server.base_url + "/chat/completions", json=chat_body(stream=True)) as response:
        raw = response.read()
    events = raw.split(separator.encode())
    assert events[-1] == b"" and len(events) - 1 == 1 + 8 + 1 + 1
    assert events[-2] == b"data: [DONE]" and all(event.startswith(b"data: {") for event in events[:-2])
    with httpx.stream("POST", server.base_url + "/responses", json={"model": "o3", "input": "x", "stream": True}) as r:
        first = r.read().split(separator.encode())[0]
    line_end = "\r\n" if separator.startswith("\r\n") else separator[0]
    assert first.startswith(f"event: response.created{line_end}data: {{".encode())
    deltas = client.chat.completions.create(model="o3", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in deltas)
    assert text == "This is a simulated reply from the upstream."


def test_wait_for_is_bounded(sim: Simulator) -> None:
    started = time.monotonic()
    assert not sim.wait_for(lambda: False, timeout=0.05)
    assert sim.wait_for(lambda: True, timeout=0)
    assert time.monotonic() - started < 1


def test_open_connections_follow_the_sockets() -> None:
    with SimServer() as local:
        sim = local.sim
        sockets = [socket.create_connection(("127.0.0.1", local.port), timeout=5) for _ in range(3)]
        try:
            assert sim.wait_for(lambda: sim.open_connections == 3)
            sockets.pop().close()
            sockets.pop().close()
            assert sim.wait_for(lambda: sim.open_connections == 1)
        finally:
            for conn in sockets:
                conn.close()
        assert sim.wait_for(lambda: sim.open_connections == 0)
        assert sim.stats()["connections"] == 3
        sim.reset()
        assert sim.stats()["connections"] == 0 and sim.open_connections == 0


def test_billing_counts_accepted_refused_and_delivered_work(
    client: openai.OpenAI, server: SimServer, sim: Simulator
) -> None:
    sim.script(
        Reply(usage=USAGE),  # flex, whole body: accepted and delivered
        Reply("flex_429"),  # refused
        Reply("reset"),  # refused: nothing was accepted
        Reply("cut_stream", usage=USAGE),  # accepted, its usage never sent
        Reply(usage=USAGE),  # a stream without include_usage: accepted, no usage sent
        Reply(usage=USAGE),  # a stream with include_usage: accepted and delivered
        Reply("stream_error"),  # an in-band flex error: refused
        Reply("reset", delay_s=0.01, usage=USAGE),  # accepted, then a silence and a reset
    )
    client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="o3", messages=MESSAGES)
    with pytest.raises(openai.APIConnectionError):
        list(client.chat.completions.create(model="o3", messages=MESSAGES, stream=True))
    list(client.chat.completions.create(model="o3", messages=MESSAGES, stream=True))
    list(
        client.chat.completions.create(
            model="o3", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="o3", messages=MESSAGES, stream=True, service_tier="flex"))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="o3", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)  # refused by validation
    assert sim.settle()
    billing = sim.billing()
    assert (billing.accepted, billing.refused, billing.delivered, billing.undelivered) == (5, 4, 2, 3)
    assert billing.delivered_tokens == {"flex": USAGE, "default": USAGE}
    assert billing.accepted_tokens == {"flex": USAGE, "default": {k: v * 4 for k, v in USAGE.items()}}
    assert [r.accepted for r in sim.requests] == [True, False, False, True, True, True, False, True, False]
    published = httpx.get(server.url + "/_sim/billing").json()
    assert (published["accepted"], published["undelivered"], published["delivered_tokens"]["flex"]) == (5, 3, USAGE)


def test_canned_download_keeps_raw_header_bytes_and_length(server: SimServer, sim: Simulator) -> None:
    disposition = 'attachment; filename="résumé.pdf"'
    body = bytes(range(256)) * 40
    headers = (("content-disposition", disposition), ("content-type", "application/pdf"))
    sim.set_canned("/v1/files/file-1/content", Canned(headers=headers, body=body))
    whole = httpx.get(server.base_url + "/files/file-1/content")
    assert whole.content == body and whole.headers["content-length"] == str(len(body))
    assert dict(whole.headers.raw)[b"content-disposition"] == disposition.encode()  # UTF-8 on the wire
    head = httpx.head(server.base_url + "/files/file-1/content")
    assert (head.status_code, head.headers["content-length"], head.content) == (200, str(len(body)), b"")
    assert [r.method for r in sim.requests] == ["GET", "HEAD"] and sim.requests[0].outcome == "canned"


def test_canned_download_cut_mid_body(server: SimServer, sim: Simulator) -> None:
    body = b"x" * 10_000
    sim.set_canned("/v1/files/file-2/content", Canned(body=body, cut_at=1000))
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("GET", server.base_url + "/files/file-2/content") as response,
    ):
        assert response.headers["content-length"] == "10000"
        for chunk in response.iter_raw():
            received += chunk
    assert received == body[:1000]
    assert sim.requests[-1].finished.wait(5)
    with pytest.raises(ValueError, match="cut_at"):
        Canned(body=b"ab", cut_at=2)


def test_paths_outside_v1_are_recorded(server: SimServer, sim: Simulator) -> None:
    outside = exchange(server.port, b"GET /admin HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n")
    assert outside.startswith(b"HTTP/1.1 404")
    escaping = exchange(server.port, b"GET /v1/%2e%2e/admin?x=%23 HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n")
    assert escaping.startswith(b"HTTP/1.1 200")  # aiohttp routes the raw path; the recording tells
    first, second = sim.requests
    assert (first.path, first.outcome, first.outside_v1) == ("/admin", "outside_v1", True)
    assert (second.path, second.query, second.outside_v1) == ("/v1/%2e%2e/admin", "x=%23", True)
    assert sim.stats()["outside_v1"] == 1


@pytest.mark.parametrize(
    ("path", "outside"),
    [
        ("/v1/models", False), ("/v1/./chat/completions", False), ("/v1/a/../models", False),
        ("/v1/../admin", True), ("/v1/a/../../x", True), ("/v1/%2E%2E/x", True), ("/v1/a%2F..%2F..%2Fx", True),
        ("/v1/a\\..\\..\\x", True), ("//v1/x", True), ("/v1", True), ("/admin", True),
    ],
)  # fmt: skip
def test_leaves_v1(path: str, outside: bool) -> None:
    assert leaves_v1(path) is outside


def test_an_aborted_upload_is_recorded(server: SimServer, sim: Simulator) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        conn.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Length: 1000\r\n\r\n{"model"')
        assert sim.wait_for(lambda: sim.open_connections >= 1)
    assert sim.wait_for(lambda: bool(sim.requests) and sim.requests[-1].ended.is_set())
    recorded = sim.requests[-1]
    assert (recorded.outcome, recorded.body) == ("upload_aborted", b"")
    assert recorded.closed_by_peer.is_set() and sim.stats()["upload_aborted"] == 1


def test_control_release_and_new_kinds(server: SimServer, sim: Simulator) -> None:
    scripted = httpx.post(server.url + "/_sim/script", json=[{"kind": "stall", "events": 1, "separator": "\r\n\r\n"}])
    assert scripted.json() == {"scripted": 1, "pending": 1}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=chat_body(stream=True), timeout=10) as r:
        assert sim.wait_for(lambda: sim.hanging == 1)
        assert httpx.post(server.url + "/_sim/release").json() == {"released": 1}
        raw = r.read()
    assert raw.endswith(b"data: [DONE]\r\n\r\n")
    assert httpx.get(server.url + "/_sim/stats").json()["open_connections"] >= 1  # this request's own


# -- the raw upstream (tests/rawup.py) ---------------------------------------------------------------------


def test_rawup_records_the_raw_target_and_sends_raw_bytes() -> None:
    async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        disposition = 'attachment; filename="résumé.pdf"'.encode("latin-1")  # not UTF-8: aiohttp cannot send it
        writer.write(rawup.response(200, [(b"content-disposition", disposition)], request.body[::-1]))

    with RawUpstream(answer) as upstream:
        target = b"/v1/a%2Fb/../c%20d?x=%23&y=%2F"
        answered = exchange(
            upstream.port, b"POST " + target + b" HTTP/1.1\r\nHost: raw\r\nContent-Length: 3\r\n\r\nabc"
        )
        assert answered.startswith(b"HTTP/1.1 200") and answered.endswith(b"\r\n\r\ncba")
        assert b'filename="r\xe9sum\xe9.pdf"' in answered
        chunked = httpx.post(upstream.url + "/v1/files", content=iter([b"hello ", b"world"]))
        assert chunked.content == b"dlrow olleh"
    first, second = upstream.requests
    assert (first.method, first.target, first.header(b"HOST")) == ("POST", target, b"raw")
    assert first.line == b"POST " + target + b" HTTP/1.1"
    assert (second.target, second.body, second.header(b"transfer-encoding")) == (
        b"/v1/files",
        b"hello world",
        b"chunked",
    )
    assert not first.peer_closed.is_set()


def test_rawup_resets_and_sees_the_peer_leave() -> None:
    async def answer(request: RawRequest, writer: asyncio.StreamWriter) -> None:
        if request.target == b"/v1/reset":
            rawup.reset(writer)
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")  # headers and part of the body
        await writer.drain()
        await asyncio.wait_for(request.gone.wait(), 10)

    with RawUpstream(answer) as upstream:
        with pytest.raises(httpx.ReadError):
            httpx.get(upstream.url + "/v1/reset")
        with httpx.stream("GET", upstream.url + "/v1/wait") as response:
            assert response.status_code == 200  # leave without reading the body
        reset, left = upstream.requests
        assert left.peer_closed.wait(5)
        assert not reset.peer_closed.is_set()


# -- options, server and command line ----------------------------------------------------------------------


def test_invalid_options_and_replies_are_refused() -> None:
    with pytest.raises(ValueError, match="flex_busy_share"):
        SimOptions(flex_busy_share=1.5)
    with pytest.raises(ValueError, match="burst_s"):
        SimOptions(burst_s=0)
    with pytest.raises(ValueError, match="busy_period_s"):
        SimOptions(busy_period_s=-1)
    with pytest.raises(ValueError, match="busy_for_s"):
        SimOptions(busy_period_s=1, busy_for_s=2)
    with pytest.raises(ValueError, match="unknown reply kind"):
        Reply("explode")
    with pytest.raises(ValueError, match="usage"):
        Reply(usage={"prompt": 1})
    with pytest.raises(ValueError, match="separator"):
        Reply(separator="\r\n")  # one line end, not an event boundary


def test_options_are_replaceable_at_run_time(client: openai.OpenAI, sim: Simulator) -> None:
    sim.options = dataclasses.replace(sim.options, known_models=("o3*",))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=MESSAGES)


def test_server_stops_promptly_with_a_request_hanging() -> None:
    server = SimServer().start()
    server.sim.script(Reply("hang"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        conn.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\n{"model":"o3"}\n')
        deadline = time.monotonic() + 5
        while server.sim.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 3
        assert conn.recv(100) == b""  # closed without an answer
    server.stop()  # a second stop is harmless


def test_cli_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        sim_main(["--flex-busy", "2"])
    assert caught.value.code == 2
    assert "flex_busy_share" in capsys.readouterr().err


def test_cli_sets_the_periodic_busy_pattern() -> None:
    from proxy.sim.cli import build_parser, options_from

    options = options_from(build_parser().parse_args(["--busy-period-s", "10", "--busy-for-s", "3"]))
    assert (options.busy_period_s, options.busy_for_s) == (10.0, 3.0)
    with pytest.raises(SystemExit) as caught:
        sim_main(["--busy-period-s", "2", "--busy-for-s", "3"])
    assert caught.value.code == 2


def test_cli_serves_and_exits_on_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "proxy.sim",
        "--port",
        str(port),
        "--latency-standard",
        "0",
        "--latency-flex",
        "0",
        "--flex-busy",
        "0",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/_sim/stats", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.05)
        with openai.OpenAI(base_url=base_url, api_key="k", max_retries=0) as sdk:
            answer = sdk.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
        assert answer.service_tier == "flex"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    assert process.returncode == 0, stderr
    assert f"FLEX_PROXY_UPSTREAM_BASE_URL={base_url}" in stdout
    assert stdout.count("\n") == 1
