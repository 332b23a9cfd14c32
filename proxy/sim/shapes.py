"""Pure: the events a scripted stream sends, and where it pauses, cuts, stalls and carries its usage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import errors, payloads

CHAT, RESPONSES, COMPACT = "chat", "responses", "compact"
# Events a stream sends before its first content delta: chat's role chunk; responses' four opening events.
PRELUDE = {CHAT: 1, RESPONSES: 4}
KEEPALIVE = b": keepalive\n\n"
# Not JSON: a `data:` line cut inside an object, as a broken encoder or a truncating middlebox would send.
_MALFORMED = b'data: {"id": "chatcmpl-broken", "choices": [\n\n'


@dataclass(frozen=True)
class StreamPlan:
    """What to send on a 200 event stream, and when.

    first_delay_s: a silence between the headers and the first event.
    cut_after: close the connection once this many events are sent.
    stall_after, stall_s: a silence once this many events are sent, then the rest.
    usage_at: the index of the event that carries the usage; `on_usage` runs just before it is sent.
    close_after: close the connection once the stream has ended.
    """

    events: list[bytes]
    interval_s: float = 0.0
    first_delay_s: float = 0.0
    cut_after: int | None = None
    stall_after: int | None = None
    stall_s: float = 0.0
    usage_at: int | None = None
    on_usage: Callable[[], None] | None = None
    close_after: bool = False


def frame(event: bytes, separator: str) -> bytes:
    """Re-end one `\\n`-framed event with `separator`; its inner lines end like the separator's first line."""
    if separator == "\n\n":
        return event
    line_end = "\r\n" if separator.startswith("\r\n") else separator[0]
    return event[:-2].replace(b"\n", line_end.encode()) + separator.encode()


def success(
    endpoint: str, kind: str, events: list[bytes], usage_event: bytes | None, content_events: int
) -> tuple[list[bytes], int | None]:
    """The events of a successful stream shaped by `kind`, and the index of the usage event in them.

    no_done drops chat's `data: [DONE]`; malformed_event puts a non-JSON event among the deltas.
    """
    shaped = list(events)
    if kind == "no_done" and endpoint == CHAT and shaped[-1] == payloads.sse("[DONE]"):
        shaped.pop()
    if kind == "malformed_event":
        prefix = b"event: response.output_text.delta\n" if endpoint == RESPONSES else b""
        shaped.insert(PRELUDE[endpoint] + content_events // 2, prefix + _MALFORMED)
    return shaped, None if usage_event is None else shaped.index(usage_event)


def in_band_error(endpoint: str, model: str, requested_tier: str | None, prelude: bool) -> list[bytes]:
    """A 200 stream carrying the flex capacity error: chat's `data: {"error"}`, responses' `event: error`.

    With `prelude`, the real openings come first: an SSE comment, and on responses `response.created` and
    `response.in_progress`.
    """
    error = errors.flex_unavailable()["error"]
    if endpoint == CHAT:
        return [*([KEEPALIVE] if prelude else []), payloads.sse({"error": error})]
    events: list[bytes] = []
    if prelude:
        opening: dict[str, Any] = payloads.response_object(
            payloads.new_id("resp_"), model, requested_tier or "auto", [], None
        )
        created = {"type": "response.created", "sequence_number": 0, "response": opening}
        progress = {"type": "response.in_progress", "sequence_number": 1, "response": opening}
        events = [
            payloads.sse(created, event="response.created"),
            payloads.sse(progress, event="response.in_progress"),
            KEEPALIVE,
        ]
    fields = {"code": error["code"], "message": error["message"], "param": None}
    number = 2 if prelude else 0
    return [*events, payloads.sse({"type": "error", **fields, "sequence_number": number}, event="error")]
