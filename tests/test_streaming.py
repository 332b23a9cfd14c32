"""proxy.streaming: whole SSE events from arbitrary chunks, and what the relay reads, keeps and drops."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx2
import openai
import pytest

from proxy.streaming import Event, SSEDecoder, StreamState


def _stream(eol: str) -> bytes:
    lines = [
        ": keep-alive", "",
        "event: response.created", 'data: {"type":"response.created","sequence_number":0}', "",
        'data: {"a":1,', 'data: "b":2}', "",
        "data:no-space", "",
        "id: 7", "retry: 10", "data: ", "",
        "event: ping", "",
        "data: [DONE]", "",
    ]  # fmt: skip
    return "".join(line + eol for line in lines).encode()


EXPECTED = [
    (None, b""),
    ("response.created", b'{"type":"response.created","sequence_number":0}'),
    (None, b'{"a":1,\n"b":2}'),
    (None, b"no-space"),
    (None, b""),
    ("ping", b""),
    (None, b"[DONE]"),
]
EOLS = pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])


def _feed_all(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events, decoder.pending


def _feed_to_end(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    """As the relay does: feed every chunk, then flush at the end of the stream (a last lone \r waits for it)."""
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    tail = decoder.flush()
    return events + ([tail] if tail is not None else []), decoder.pending


@EOLS
def test_decoder_whole_stream(eol: str) -> None:
    stream = _stream(eol)
    events, pending = _feed_to_end([stream])
    assert [(e.event, e.data) for e in events] == EXPECTED
    assert b"".join(e.raw for e in events) == stream
    assert pending == b""


@EOLS
def test_decoder_every_split_point(eol: str) -> None:
    stream = _stream(eol)
    whole, _ = _feed_to_end([stream])
    for i in range(len(stream) + 1):
        assert _feed_to_end([stream[:i], stream[i:]]) == (whole, b""), i


@EOLS
def test_decoder_every_pair_of_split_points(eol: str) -> None:
    stream = _stream(eol)
    whole, _ = _feed_to_end([stream])
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert _feed_to_end([stream[:i], stream[i:j], stream[j:]]) == (whole, b""), (i, j)


@EOLS
def test_decoder_byte_by_byte(eol: str) -> None:
    stream = _stream(eol)
    assert _feed_to_end([stream[i : i + 1] for i in range(len(stream))]) == _feed_to_end([stream])


@pytest.mark.parametrize(
    ("chunks", "events", "pending"),
    [
        ([b"data: a"], [], b"data: a"),
        ([b"data: a\n"], [], b"data: a\n"),
        ([b"data: a\r\n\r"], [], b"data: a\r\n\r"),
        ([b"data: a\n\ndata: b"], [(None, b"a")], b"data: b"),
        ([b"data: a\r\n\r", b"\n"], [(None, b"a")], b""),
        ([b"", b"data: a\n\n", b""], [(None, b"a")], b""),
        ([b"data: \xff\xfe\n\n"], [(None, b"\xff\xfe")], b""),
        ([b"event: \xff\ndata: x\n\n"], [("\ufffd", b"x")], b""),
        ([b"data\n\n"], [(None, b"")], b""),
        ([b"data:  two spaces\n\n"], [(None, b" two spaces")], b""),
        # Every pair of line ends is an event boundary (the SSE spec: a line ends with CRLF, LF or CR).
        ([b"data: a\n\r\ndata: b\r\n\ndata: c\r\r\ndata: d\n\rx"], [(None, b"a"), (None, b"b"), (None, b"c"),
                                                                   (None, b"d")], b"x"),
        ([b"data: a\r", b"\r"], [], b"data: a\r\r"),  # the second \r may yet be the start of \r\n
        ([b"data: a\r", b"\r", b"\n"], [(None, b"a")], b""),
    ],
)
def test_decoder_partial_and_odd_input(
    chunks: list[bytes], events: list[tuple[str | None, bytes]], pending: bytes
) -> None:
    got, left = _feed_all(chunks)
    assert ([(e.event, e.data) for e in got], left) == (events, pending)


def test_decoder_large_event_in_small_chunks_is_linear() -> None:
    # 1024 feeds of 512 bytes: a linear decoder needs a few ms, the re-scanning one reads 256 MB (over a second).
    stream = b"event: response.completed\ndata: " + b"x" * (1 << 19) + b"\n\n"
    decoder = SSEDecoder()
    started = time.perf_counter()
    events = [event for i in range(0, len(stream), 512) for event in decoder.feed(stream[i : i + 512])]
    elapsed = time.perf_counter() - started
    assert len(events) == 1
    assert elapsed < 0.25


def _sse(obj: Any, event: str | None = None) -> Event:
    data = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    raw = head + b"data: " + data + b"\n\n"
    return Event(raw, event, data)


def _chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "o3", "service_tier": "flex",
            "choices": choices, **extra}  # fmt: skip


DELTA = [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]
USAGE = {
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "total_tokens": 15,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
HEAD = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"o3","service_tier":"flex"'


@pytest.mark.parametrize(
    ("strip_usage", "event", "out"),
    [
        pytest.param(True, _sse(_chunk(DELTA, usage=None)),
                     HEAD + b',"choices":' + json.dumps(DELTA, separators=(",", ":")).encode() + b"}\n\n",
                     id="null-usage-removed"),
        pytest.param(False, _sse(_chunk(DELTA, usage=None)), _sse(_chunk(DELTA, usage=None)).raw,
                     id="null-usage-kept"),
        pytest.param(True, _sse(_chunk([], usage=None, obfuscation="abc")),
                     HEAD + b',"choices":[],"obfuscation":"abc"}\n\n', id="null-usage-before-another-member"),
        pytest.param(True, _sse(b'{"usage":null,"id":"c","choices":[]}'), b'data: {"id":"c","choices":[]}\n\n',
                     id="null-usage-first-member"),
        pytest.param(True, _sse(b'{"id":"c", "usage" : null }'), b'data: {"id":"c" }\n\n',
                     id="null-usage-with-spaces"),
        pytest.param(True, _sse(b'{"choices":[{"delta":{"content":"\\"usage\\":null,"}}],"usage":null}'),
                     b'data: {"choices":[{"delta":{"content":"\\"usage\\":null,"}}]}\n\n',
                     id="escaped-text-in-content-untouched"),
        pytest.param(True, _sse(b'{"choices":[{"delta":{"x":{"usage":null}}}],"usage":null}'),
                     b'data: {"choices":[{"delta":{"x":{"usage":null}}}]}\n\n',
                     id="nested-lone-member-not-counted"),
        pytest.param(True, _sse(b'{"choices":[{"delta":{"x":{"usage":null,"y":1}}}],"usage":null}'),
                     b'data: {"choices":[{"delta":{"x":{"usage":null,"y":1}}}],"usage":null}\n\n',
                     id="ambiguous-left-alone"),
        pytest.param(True, _sse(_chunk([], usage=USAGE)), b"", id="usage-chunk-dropped"),
        pytest.param(False, _sse(_chunk([], usage=USAGE)), _sse(_chunk([], usage=USAGE)).raw, id="usage-chunk-kept"),
        pytest.param(True, _sse(_chunk(DELTA, usage=USAGE)), _sse(_chunk(DELTA, usage=USAGE)).raw,
                     id="usage-with-choices-kept"),
        pytest.param(True, _sse(_chunk(DELTA)), _sse(_chunk(DELTA)).raw, id="no-usage-member"),
        pytest.param(True, _sse(b"[DONE]"), b"data: [DONE]\n\n", id="done"),
        pytest.param(True, Event(b": ping\n\n", None, b""), b": ping\n\n", id="comment"),
        pytest.param(True, _sse(b"not json"), b"data: not json\n\n", id="not-json"),
        pytest.param(True, _sse(b"[1,2]"), b"data: [1,2]\n\n", id="json-not-object"),
    ],
)  # fmt: skip
def test_chat_take_output(strip_usage: bool, event: Event, out: bytes) -> None:
    assert StreamState("chat", strip_usage).take(event) == out


@pytest.mark.parametrize("strip_usage", [True, False])
def test_chat_stream_state(strip_usage: bool) -> None:
    state = StreamState("chat", strip_usage)
    events = [
        _sse(_chunk(DELTA, usage=None, service_tier="default")),
        _sse(_chunk(DELTA, usage=None)),
        _sse(_chunk([], usage=USAGE)),
        _sse(b"[DONE]"),
    ]
    out = [state.take(e) for e in events]
    assert (out[2] == b"") is strip_usage
    assert (b'"usage":null' in out[0], b'"usage":null' in out[1]) == (not strip_usage, not strip_usage)
    assert out[3] == b"data: [DONE]\n\n"
    assert (state.served_tier, state.usage_body, state.error, state.finished, state.events) == (
        "flex", _chunk([], usage=USAGE), None, True, 4,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param(
            [_sse(_chunk(DELTA, usage=None))],
            {"served_tier": "flex", "usage_body": None, "error": None, "finished": False},
            id="cut-short",
        ),
        pytest.param(
            [_sse({"error": {"message": "boom", "type": "server_error", "code": "server_is_overloaded"}})],
            {"served_tier": None, "usage_body": None, "finished": False,
             "error": {"message": "boom", "type": "server_error", "code": "server_is_overloaded"}},
            id="in-band-error",
        ),
        pytest.param(
            [_sse({"error": "a string"})],
            {"served_tier": None, "usage_body": None, "error": None, "finished": False},
            id="error-not-an-object",
        ),
        pytest.param(
            [_sse(_chunk(DELTA, service_tier=None)), _sse(b"[DONE]")],
            {"served_tier": None, "usage_body": None, "error": None, "finished": True},
            id="tier-null",
        ),
    ],
)  # fmt: skip
def test_chat_state_fields(events: list[Event], expected: dict[str, Any]) -> None:
    state = StreamState("chat", False)
    for event in events:
        assert state.take(event) == event.raw
    assert {name: getattr(state, name) for name in expected} == expected


RESP_USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}  # fmt: skip


def _response(status: str, tier: str | None, **extra: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "status": status, "service_tier": tier, **extra}


def _rev(kind: str, seq: int, *, named: bool = True, **fields: Any) -> Event:
    return _sse({"type": kind, "sequence_number": seq, **fields}, kind if named else None)


CREATED = _rev("response.created", 0, response=_response("in_progress", "auto"))
IN_PROGRESS = _rev("response.in_progress", 1, response=_response("in_progress", "auto"))
DELTA_EVENT = _rev("response.output_text.delta", 2, delta="Hi", item_id="msg_1", output_index=0, content_index=0)
COMPLETED_RESPONSE = _response("completed", "flex", usage=RESP_USAGE)
FAILED_ERROR = {"code": "server_error", "message": "The model failed."}


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param(
            [CREATED, IN_PROGRESS, DELTA_EVENT, _rev("response.completed", 3, response=COMPLETED_RESPONSE)],
            {"served_tier": "flex", "usage_body": COMPLETED_RESPONSE, "error": None, "finished": True,
             "last_sequence": 3},
            id="completed-overrides-created",
        ),
        pytest.param(
            [CREATED, _rev("response.completed", 1, named=False, response=COMPLETED_RESPONSE)],
            {"served_tier": "flex", "usage_body": COMPLETED_RESPONSE, "finished": True, "last_sequence": 1},
            id="type-from-data-when-unnamed",
        ),
        pytest.param(
            [_rev("response.created", 0, response=_response("in_progress", "flex")),
             _rev("response.completed", 1, response=_response("completed", "default", usage=RESP_USAGE))],
            {"served_tier": "default", "usage_body": _response("completed", "default", usage=RESP_USAGE)},
            id="served-default-after-flex-echo",
        ),
        pytest.param(
            [CREATED, _rev("response.incomplete", 1, response=_response("incomplete", "flex", usage=RESP_USAGE))],
            {"served_tier": "flex", "usage_body": _response("incomplete", "flex", usage=RESP_USAGE),
             "finished": True, "error": None},
            id="incomplete",
        ),
        pytest.param(
            [CREATED, _rev("response.failed", 1, response=_response("failed", "flex", error=FAILED_ERROR))],
            {"served_tier": "flex", "error": FAILED_ERROR, "finished": True, "last_sequence": 1},
            id="failed",
        ),
        pytest.param(
            [CREATED, IN_PROGRESS,
             _rev("error", 2, code="server_is_overloaded", message="Overloaded", param=None)],
            {"served_tier": "auto", "finished": False, "usage_body": None, "last_sequence": 2,
             "error": {"type": "error", "sequence_number": 2, "code": "server_is_overloaded",
                       "message": "Overloaded", "param": None}},
            id="event-error",
        ),
        pytest.param(
            [CREATED, DELTA_EVENT],
            {"served_tier": "auto", "usage_body": None, "error": None, "finished": False, "last_sequence": 2},
            id="cut-short",
        ),
        pytest.param(
            [Event(b": ping\n\n", None, b""), _sse(b"not json", "response.created")],
            {"served_tier": None, "finished": False, "events": 2, "last_sequence": -1},
            id="comment-and-garbage",
        ),
    ],
)  # fmt: skip
def test_responses_state(events: list[Event], expected: dict[str, Any]) -> None:
    state = StreamState("responses", False)
    for event in events:
        assert state.take(event) == event.raw
    assert {name: getattr(state, name) for name in expected} == expected


def test_chat_error_event_bytes() -> None:
    state = StreamState("chat", True)
    assert state.error_event("The upstream stopped.", "stream_incomplete") == (
        b'data: {"error": {"message": "The upstream stopped.", "type": "upstream_error", "param": null, '
        b'"code": "stream_incomplete"}}\n\n'
    )


@pytest.mark.parametrize(("last_sequence", "expected"), [(-1, 0), (0, 1), (41, 42)])
def test_responses_error_event_sequence(last_sequence: int, expected: int) -> None:
    state = StreamState("responses", False, last_sequence=last_sequence)
    events, pending = _feed_all([state.error_event("The upstream stopped.", "stream_incomplete")])
    assert pending == b""
    assert [e.event for e in events] == ["error"]
    payload = json.loads(events[0].data)
    assert (payload["sequence_number"], payload["code"], payload["message"], payload["param"]) == (
        expected, "stream_incomplete", "The upstream stopped.", None,
    )  # fmt: skip


def _sdk(body: bytes) -> openai.OpenAI:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    return openai.OpenAI(
        api_key="sk-test", max_retries=0, http_client=httpx2.Client(transport=httpx2.MockTransport(handler))
    )


def test_chat_error_event_raises_in_the_sdk() -> None:
    state = StreamState("chat", True)
    first = _sse(_chunk(DELTA))
    body = state.take(first) + state.error_event("The upstream stopped.", "stream_incomplete")
    stream = _sdk(body).chat.completions.create(model="o3", messages=[{"role": "user", "content": "hi"}], stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hi"]
    assert info.value.message == "The upstream stopped."
    assert info.value.code == "stream_incomplete"


def test_responses_error_event_is_an_sdk_error_event() -> None:
    state = StreamState("responses", False)
    body = state.take(CREATED) + state.error_event("The upstream stopped.", "stream_incomplete")
    events = list(_sdk(body).responses.create(model="o3", input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", "error"]
    error = events[1]
    assert isinstance(error, openai.types.responses.ResponseErrorEvent)
    assert (error.sequence_number, error.code, error.message) == (1, "stream_incomplete", "The upstream stopped.")


@pytest.mark.parametrize(
    ("stream", "finished"),
    [
        (b'data: {"choices":[]}\n\ndata: [DONE]\n', True),  # the terminator's blank line never came
        (b'data: {"choices":[]}\n\ndata: [DONE]', True),
        (b'data: {"choices":[]}\n\n', False),
        (b'data: {"choices":[]}\n\n\n', False),
    ],
)
def test_flush_passes_on_an_unterminated_last_event(stream: bytes, finished: bool) -> None:
    decoder = SSEDecoder()
    state = StreamState("chat", strip_usage=False)
    sent = b"".join(state.take(event) for event in decoder.feed(stream))
    tail = decoder.flush()
    if tail is not None:
        sent += state.take(tail)
    assert sent == stream  # every byte passed on, in order
    assert state.finished is finished
    assert decoder.flush() is None
