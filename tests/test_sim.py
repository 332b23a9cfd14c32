"""The simulated upstream on a real loopback port, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import base64
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

from proxy.sim import Reply, SimOptions, SimServer, Simulator
from proxy.sim.cli import main as sim_main
from proxy.sim.options import window_busy

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


# -- options, server and command line ----------------------------------------------------------------------


def test_invalid_options_and_replies_are_refused() -> None:
    with pytest.raises(ValueError, match="flex_busy_share"):
        SimOptions(flex_busy_share=1.5)
    with pytest.raises(ValueError, match="burst_s"):
        SimOptions(burst_s=0)
    with pytest.raises(ValueError, match="unknown reply kind"):
        Reply("explode")
    with pytest.raises(ValueError, match="usage"):
        Reply(usage={"prompt": 1})


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
