"""Bodies and SSE events of successful chat completions and responses, as the openai SDK parses them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .options import SimOptions

_WORDS = ("This", "is", "a", "simulated", "reply", "from", "the", "upstream.")


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer; `cached` is part of `input`, `reasoning` part of `output`."""

    input: int
    cached: int
    output: int
    reasoning: int

    @classmethod
    def estimate(cls, body_size: int, options: SimOptions, override: dict[str, int] | None) -> Usage:
        """Roughly four bytes a token, as OpenAI's rule of thumb; `override` wins key by key."""
        prompt = max(1, body_size // 4)
        values = {
            "input": prompt,
            "cached": int(prompt * options.cached_share),
            "output": options.completion_tokens,
            "reasoning": options.reasoning_tokens,
        }
        values.update(override or {})
        return cls(**values)

    def chat(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.input,
            "completion_tokens": self.output,
            "total_tokens": self.input + self.output,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def responses(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.input + self.output,
        }


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def text_pieces(count: int) -> list[str]:
    """The reply text cut into `count` deltas; the non-stream text is their concatenation."""
    return [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(count)]


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE event; `data` is JSON-encoded unless it is already a string (the chat `[DONE]`)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode()


def chat_completion(model: str, tier: str, text: str, usage: Usage) -> dict[str, Any]:
    """A non-stream `chat.completion` object."""
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage.chat(),
        "service_tier": tier,
        "system_fingerprint": "fp_sim",
    }


def chat_chunks(model: str, tier: str, pieces: list[str], usage: Usage, include_usage: bool) -> Iterator[bytes]:
    """The SSE events of a chat stream: role, one delta a piece, finish, usage if asked, then [DONE]."""
    base: dict[str, Any] = {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "service_tier": tier,
        "system_fingerprint": "fp_sim",
    }

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        return sse({**base, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
    for piece in pieces:
        yield chunk({"content": piece}, None)
    yield chunk({}, "stop")
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage.chat()})
    yield sse("[DONE]")


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [output_text(text)] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(
    response_id: str, model: str, tier: str, output: list[dict[str, Any]], usage: Usage | None
) -> dict[str, Any]:
    """A `response` object; without usage it is the in-progress one a stream starts with."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if usage else "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "metadata": {},
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": tier,
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage.responses() if usage else None,
        "user": None,
    }


def response_events(
    model: str, requested_tier: str | None, tier: str, pieces: list[str], usage: Usage
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of a Responses stream, from response.created to response.completed.

    The opening events echo the requested tier, as OpenAI does; only response.completed has the served one.
    """
    response_id, item_id, text = new_id("resp_"), new_id("msg_"), "".join(pieces)
    opening = response_object(response_id, model, requested_tier or "auto", [], None)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield "response.created", {"response": opening}
    yield "response.in_progress", {"response": opening}
    yield "response.output_item.added", {"output_index": 0, "item": message_item(item_id, "", "in_progress")}
    yield "response.content_part.added", {**where, "part": output_text("")}
    for piece in pieces:
        yield "response.output_text.delta", {**where, "delta": piece, "logprobs": []}
    yield "response.output_text.done", {**where, "text": text, "logprobs": []}
    yield "response.content_part.done", {**where, "part": output_text(text)}
    item = message_item(item_id, text, "completed")
    yield "response.output_item.done", {"output_index": 0, "item": item}
    yield "response.completed", {"response": response_object(response_id, model, tier, [item], usage)}


def numbered(events: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[bytes]:
    """Encode Responses events with their `type` and an increasing `sequence_number`."""
    for number, (name, data) in enumerate(events):
        yield sse({"type": name, "sequence_number": number, **data}, event=name)


def compacted_response(model: str, tier: str, usage: Usage) -> dict[str, Any]:
    """The answer of POST /v1/responses/compact: one opaque compaction item."""
    return {
        "id": new_id("resp_"),
        "object": "response.compaction",
        "created_at": int(time.time()),
        "model": model,
        "output": [{"type": "compaction", "id": new_id("cmp_"), "encrypted_content": "c2ltdWxhdGVk"}],
        "usage": usage.responses(),
        "service_tier": tier,
    }
