"""Server-sent events: split a byte stream into whole events, read what the proxy needs from them,
and pass the original bytes on (minus the usage chunk the proxy asked for on the client's behalf)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from . import jsontext

# An event ends with an empty line; a line ends with CRLF, LF or CR (the SSE spec), so any two line ends in a row
# end an event: \n\n, \r\r, \r\n\r\n, \n\r\n, \r\n\n, \r\r\n, \n\r.
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_LINE = re.compile(rb"\r\n|\n|\r")
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')
TERMINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# What a Responses stream says before any work is done: a flex error may still follow, and be retried.
OPENING_RESPONSE_EVENTS = frozenset({"response.created", "response.in_progress", "response.queued"})


@dataclass(slots=True)
class Event:
    raw: bytes  # the event as received, its blank-line terminator included
    event: str | None
    data: bytes


class SSEDecoder:
    """Feed network chunks in, get whole events out; an event split across chunks waits for its end."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes already searched for a boundary, so a big event costs linear time

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer
        buffer += chunk
        events: list[Event] = []
        start = 0
        # A boundary is at most 4 bytes long: it may straddle the old end of the buffer by 3. A \r at the very end
        # may be the first half of \r\n, so it waits for the next byte (or `flush`): an event's bytes are then the
        # same however the network cut them.
        end = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        for match in _BOUNDARY.finditer(buffer, max(0, self._scanned - 3), end):
            raw = bytes(buffer[start : match.end()])
            events.append(_parse_block(raw[: match.start() - start], raw))
            start = match.end()
        if start:
            del buffer[:start]
        self._scanned = max(0, end - start)
        return events

    @property
    def pending(self) -> bytes:
        return bytes(self._buffer)

    def flush(self) -> Event | None:
        """At the end of the stream, what is left as a last event: passed on rather than lost (the SDK reads it)."""
        if not self._buffer:
            return None
        raw = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return _parse_block(raw.rstrip(b"\r\n"), raw)


def _parse_block(block: bytes, raw: bytes) -> Event:
    if block.startswith(b"data: ") and b"\n" not in block and b"\r" not in block:
        return Event(raw, None, block[6:])  # one data line: nearly every event of a stream
    name: str | None = None
    data: list[bytes] = []
    for line in _LINE.split(block):
        if not line or line.startswith(b":"):
            continue
        key, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if key == b"event":
            name = value.decode("utf-8", "replace")
        elif key == b"data":
            data.append(value)
    return Event(raw, name, b"\n".join(data))


@dataclass(slots=True)
class StreamState:
    """What a relayed stream told the proxy: served tier, usage, errors, and whether it ended properly."""

    kind: str  # "chat" or "responses"
    strip_usage: bool  # the client did not ask for usage; the proxy did
    expect_usage: bool = False  # a chat stream that was asked for usage ends with it
    served_tier: str | None = None
    usage_body: dict[str, Any] | None = None  # an object carrying `usage`, for pricing.usage_from
    error: dict[str, Any] | None = None
    finished: bool = False
    committed: bool = False  # an event arrived that says the work is under way (not an opening or a comment)
    events: int = 0
    last_sequence: int = field(default=-1)
    choices_open: set[int] = field(default_factory=set)  # chat choices seen without a finish_reason yet
    choices_seen: bool = False

    def take(self, event: Event) -> bytes:
        """Note what the event says; return the bytes to send on (b"" to drop it)."""
        self.events += 1
        if self.kind == "chat":
            return self._take_chat(event)
        return self._take_responses(event)

    @property
    def complete(self) -> bool:
        """Whether the stream said all it had to: its terminal event, or for chat, every choice finished (and
        the usage asked for came) even if `[DONE]` never did."""
        if self.finished:
            return True
        return (
            self.kind == "chat"
            and self.choices_seen
            and not self.choices_open
            and (self.usage_body is not None or not self.expect_usage)
        )

    def _take_chat(self, event: Event) -> bytes:
        if not event.data and event.event is None:
            return event.raw  # a comment or keep-alive: no news
        self.committed = True
        if event.data.startswith(b"[DONE]"):
            self.finished = True
            return event.raw
        obj = json_object(event.data)
        if obj is None:
            return event.raw
        if isinstance(obj.get("error"), dict):
            self.error = obj["error"]
            return event.raw
        tier = obj.get("service_tier")
        if isinstance(tier, str):
            self.served_tier = tier
        self._note_choices(obj.get("choices"))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage_body = obj
            if self.strip_usage and obj.get("choices") == []:
                return b""
        elif self.strip_usage and "usage" in obj:
            return _drop_null_usage(event.raw)
        return event.raw

    def _note_choices(self, choices: Any) -> None:
        if not isinstance(choices, list):
            return
        for choice in choices:
            if isinstance(choice, dict) and isinstance(choice.get("index"), int):
                self.choices_seen = True
                if choice.get("finish_reason"):
                    self.choices_open.discard(choice["index"])
                else:
                    self.choices_open.add(choice["index"])

    def _take_responses(self, event: Event) -> bytes:
        obj = json_object(event.data)
        if obj is None:
            self.committed = self.committed or bool(event.data)
            return event.raw
        kind = event.event or obj.get("type")
        if kind not in OPENING_RESPONSE_EVENTS:
            self.committed = True
        sequence = obj.get("sequence_number")
        if isinstance(sequence, int):
            self.last_sequence = sequence
        if kind == "error":
            self.error = obj
        response = obj.get("response")
        if isinstance(response, dict):
            tier = response.get("service_tier")
            if isinstance(tier, str):
                self.served_tier = tier
            if kind in TERMINAL_RESPONSE_EVENTS:
                self.finished = True
                self.usage_body = response
                if kind == "response.failed" and isinstance(response.get("error"), dict):
                    self.error = response["error"]
        return event.raw

    def error_event(self, message: str, code: str) -> bytes:
        """An in-band error the SDKs raise on, for a stream the upstream cut short."""
        error = {"message": message, "type": "upstream_error", "param": None, "code": code}
        if self.kind == "chat":
            return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
        payload = {**error, "type": "error", "sequence_number": self.last_sequence + 1}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


def json_object(data: bytes) -> dict[str, Any] | None:
    """`data` parsed as a JSON object, or None when it is not one."""
    try:
        obj = jsontext.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _drop_null_usage(raw: bytes) -> bytes:
    """Remove the `"usage":null` member that include_usage adds to every chunk, when it appears once.

    Every match holds the literal `"usage"`, and starts at its first occurrence or at the comma (and blanks) just
    before it: the pattern is searched from there, not tried at every byte of the chunk."""
    at = raw.find(b'"usage"')
    if at < 0:
        return raw
    start = at
    while start > 0 and raw[start - 1] in b" \t\n\r":
        start -= 1
    if start > 0 and raw[start - 1] == ord(","):
        start -= 1
    first = _NULL_USAGE.search(raw, start)
    if first is None:
        return raw
    if raw.find(b'"usage"', first.end()) >= 0 and _NULL_USAGE.search(raw, first.end()) is not None:
        return raw  # more than once: not the member include_usage adds
    return raw[: first.start()] + raw[first.end() :]
