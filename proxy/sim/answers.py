"""The model endpoints (chat completions, responses, compact): pick a reply, then act it out on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from . import errors, payloads
from .http import admit, drop, dump, json_response
from .options import HANG_DEFAULT_S, Reply, SimOptions, served_tier
from .simulator import RecordedRequest, Simulator, validate

CHAT, RESPONSES, COMPACT = "chat", "responses", "compact"
_SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
# Events a stream sends before its first content delta: chat's role chunk; responses' four opening events.
_PRELUDE = {CHAT: 1, RESPONSES: 4}


class ModelEndpoints:
    """Handlers of POST /v1/chat/completions, /v1/responses and /v1/responses/compact."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/responses", self.responses),
            web.post("/v1/responses/compact", self.compact),
        ]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, CHAT)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, RESPONSES)

    async def compact(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, COMPACT)

    async def _answer(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        admitted = await admit(self.sim, request)
        if isinstance(admitted, web.Response):
            return admitted
        recorded, options = admitted, self.sim.options
        self.sim.count("model_requests", *(["requested_flex"] if recorded.tier == "flex" else []))
        # A scripted reply is the test's explicit word, so it skips validation and the random draws.
        reply = self.sim.pop_script()
        if reply is None:
            refusal = validate(recorded, options)
            if refusal is not None:
                status, body, outcome = refusal
                recorded.outcome = outcome
                self.sim.count(outcome)
                return json_response(status, body)
            reply = self.sim.draw_reply(recorded.tier)
        recorded.outcome = reply.kind
        self.sim.count(reply.kind)
        return await self._act(request, endpoint, recorded, reply, options)

    async def _act(
        self,
        request: web.Request,
        endpoint: str,
        recorded: RecordedRequest,
        reply: Reply,
        options: SimOptions,
    ) -> web.StreamResponse:
        """Answer as `reply` says: hang, drop, raw body, error, in-band stream error, else success."""
        kind = reply.kind
        if kind == "hang":
            await asyncio.sleep(reply.delay_s or HANG_DEFAULT_S)
            return drop(request)
        await asyncio.sleep(reply.delay_s)
        headers = _extra_headers(reply)
        if reply.body is not None:
            headers.setdefault("content-type", "application/json")
            return web.Response(status=reply.status or 200, body=reply.body, headers=headers)
        if kind == "drop":
            return drop(request)
        failure = _failure(kind, reply, recorded.model or "gpt-sim", options)
        if failure is not None:
            status, body = failure
            if kind == "rate_limit_429":
                headers = {"x-ratelimit-remaining-requests": "0", **headers}
                headers.setdefault("retry-after-ms", str(options.rate_limit_retry_ms))
            return json_response(status, body, headers)
        if kind == "stream_error":
            return await _stream(request, reply, headers, _stream_error(endpoint), 0.0)
        return await self._succeed(request, endpoint, recorded, reply, options, headers)

    async def _succeed(
        self,
        request: web.Request,
        endpoint: str,
        recorded: RecordedRequest,
        reply: Reply,
        options: SimOptions,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """A successful answer after the tier's latency; cut_stream sends only its first part."""
        model = recorded.model or "gpt-sim"
        tier = reply.served_tier or served_tier(recorded.tier)
        usage = payloads.Usage.estimate(len(recorded.body), options, reply.usage)
        await asyncio.sleep(options.latency_flex_s if tier == "flex" else options.latency_standard_s)
        count = options.stream_events if reply.events is None else reply.events
        cut_after = None
        if reply.kind == "cut_stream":
            # Here `events` counts the deltas sent before the cut; there is always more text left to send.
            cut_after = options.stream_events // 2 if reply.events is None else reply.events
            count = max(options.stream_events, cut_after + 1)
        else:
            recorded.served_tier = tier
            self.sim.count(f"served_{tier}")
        pieces = payloads.text_pieces(count)
        interval = options.event_interval_s if reply.event_interval_s is None else reply.event_interval_s

        if endpoint == COMPACT:
            compacted = payloads.compacted_response(model, tier, usage)
            return await _body(request, reply, headers, compacted, cut_after)
        if endpoint == CHAT and recorded.stream:
            chunks = payloads.chat_chunks(model, tier, pieces, usage, _include_usage(recorded.json))
            return await _stream(request, reply, headers, chunks, interval, _cut(CHAT, cut_after))
        if endpoint == CHAT:
            completion = payloads.chat_completion(model, tier, "".join(pieces), usage)
            return await _body(request, reply, headers, completion, cut_after)
        if recorded.stream:
            events = self._storing(payloads.response_events(model, recorded.tier, tier, pieces, usage))
            encoded = payloads.numbered(events)
            return await _stream(request, reply, headers, encoded, interval, _cut(RESPONSES, cut_after))
        item = payloads.message_item(payloads.new_id("msg_"), "".join(pieces), "completed")
        response = payloads.response_object(payloads.new_id("resp_"), model, tier, [item], usage)
        self.sim.store_response(response)
        return await _body(request, reply, headers, response, cut_after)

    def _storing(self, events: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Pass the events on, keeping the completed response for GET /v1/responses/{id}."""
        for name, data in events:
            if name == "response.completed":
                self.sim.store_response(data["response"])
            yield name, data


def _failure(kind: str, reply: Reply, model: str, options: SimOptions) -> tuple[int, dict[str, Any]] | None:
    """Status and error body of the error kinds; None for kinds that answer otherwise."""
    if kind == "flex_429":
        return reply.status or 429, errors.flex_unavailable()
    if kind == "rate_limit_429":
        retry_ms = options.rate_limit_retry_ms if reply.retry_after_ms is None else reply.retry_after_ms
        return reply.status or 429, errors.rate_limited(model, retry_ms)
    if kind == "quota_429":
        return reply.status or 429, errors.quota_exceeded()
    if kind == "tier_400":
        return reply.status or 400, errors.tier_unsupported()
    if kind == "server_error":
        status = reply.status or 500
        return status, errors.server_error(status)
    return None


def _extra_headers(reply: Reply) -> dict[str, str]:
    headers: dict[str, str] = {}
    if reply.retry_after_ms is not None:
        headers["retry-after-ms"] = str(reply.retry_after_ms)
    if reply.retry_after_s is not None:
        seconds = reply.retry_after_s
        headers["retry-after"] = str(int(seconds)) if seconds == int(seconds) else str(seconds)
    headers.update({k.lower(): v for k, v in (reply.headers or {}).items()})
    return headers


def _include_usage(body: Any) -> bool:
    stream_options = body.get("stream_options") if isinstance(body, dict) else None
    return isinstance(stream_options, dict) and stream_options.get("include_usage") is True


def _cut(endpoint: str, content_events: int | None) -> int | None:
    return None if content_events is None else _PRELUDE[endpoint] + content_events


def _stream_error(endpoint: str) -> Iterator[bytes]:
    """The in-band error a 200 stream starts with: chat's `data: {"error"}`, responses' `event: error`."""
    error = errors.flex_unavailable()["error"]
    if endpoint == CHAT:
        yield payloads.sse({"error": error})
    else:
        fields = {"code": error["code"], "message": error["message"], "param": None}
        yield payloads.sse({"type": "error", **fields, "sequence_number": 0}, event="error")


async def _body(
    request: web.Request, reply: Reply, headers: dict[str, str], data: dict[str, Any], cut_after: int | None
) -> web.StreamResponse:
    """A JSON answer; for cut_stream, the full content-length is announced but half the body is sent."""
    if cut_after is None:
        return json_response(reply.status or 200, data, headers)
    body = dump(data)
    partial = web.StreamResponse(status=reply.status or 200, headers={"content-type": "application/json", **headers})
    partial.content_length = len(body)
    await partial.prepare(request)
    await partial.write(body[: len(body) // 2])
    return drop(request)


async def _stream(
    request: web.Request,
    reply: Reply,
    headers: dict[str, str],
    events: Iterator[bytes],
    interval: float,
    cut_after: int | None = None,
) -> web.StreamResponse:
    """Send SSE events `interval` apart; with `cut_after`, close the connection after that many events."""
    response = web.StreamResponse(status=reply.status or 200, headers={**_SSE_HEADERS, **headers})
    await response.prepare(request)
    try:
        for sent, event in enumerate(events):
            if cut_after is not None and sent >= cut_after:
                return drop(request)
            if sent and interval:
                await asyncio.sleep(interval)
            await response.write(event)
        await response.write_eof()
    except ConnectionError:
        # The client went away mid-stream; nothing is left to tell it.
        pass
    return response
