"""The model endpoints (chat completions, responses, compact): pick a reply, then act it out on the wire."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import errors, payloads, shapes, wire
from .http import admit, close, dump, json_response
from .options import HANG_DEFAULT_S, Reply, SimOptions, served_tier
from .shapes import CHAT, COMPACT, RESPONSES, StreamPlan
from .simulator import RecordedRequest, Simulator, validate


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
        recorded, options, sim = admitted, self.sim.options, self.sim
        sim.count("model_requests", *(["requested_flex"] if recorded.tier == "flex" else []))
        # A scripted reply is the test's explicit word, so it skips validation and the random draws.
        reply = sim.pop_script()
        if reply is None:
            refusal = validate(recorded, options)
            if refusal is not None:
                status, body, outcome = refusal
                recorded.outcome = outcome
                sim.count(outcome)
                sim.refuse(recorded)
                return json_response(status, body)
            reply = sim.draw_reply(recorded.tier)
        recorded.outcome = reply.kind
        sim.count(reply.kind)
        if reply.accepts_work:
            tier = reply.served_tier or served_tier(recorded.tier)
            sim.accept(recorded, tier, payloads.Usage.estimate(len(recorded.body), options, reply.usage))
        else:
            sim.refuse(recorded)
        return await self._act(request, endpoint, recorded, reply, options)

    async def _act(
        self,
        request: web.Request,
        endpoint: str,
        recorded: RecordedRequest,
        reply: Reply,
        options: SimOptions,
    ) -> web.StreamResponse:
        """Answer as `reply` says: silence and close, raw body, error, in-band stream error, else success."""
        kind, sim = reply.kind, self.sim
        if kind in ("hang", "drop", "reset"):
            delay = reply.delay_s or (HANG_DEFAULT_S if kind == "hang" else 0.0)
            if delay:
                await wire.silence(sim, delay)
            if kind == "hang" or reply.body is None:
                return close(request, sim, recorded, reset=kind == "reset")
        elif kind != "stall" and not (kind == "slow_first_token" and recorded.stream):
            await asyncio.sleep(reply.delay_s)
        headers = _extra_headers(reply)
        if reply.body is not None:
            headers.setdefault("content-type", "application/json")
            return web.Response(status=reply.status or 200, body=reply.body, headers=headers)
        failure = _failure(kind, reply, recorded.model or "gpt-sim", options)
        if failure is not None:
            status, body = failure
            if kind == "rate_limit_429":
                headers = {"x-ratelimit-remaining-requests": "0", **headers}
                headers.setdefault("retry-after-ms", str(options.rate_limit_retry_ms))
            return json_response(status, body, headers)
        if kind in ("stream_error", "prelude_then_error"):
            events = shapes.in_band_error(endpoint, recorded.model or "gpt-sim", recorded.tier, kind != "stream_error")
            plan = StreamPlan([shapes.frame(event, reply.separator) for event in events])
            return await wire.stream(request, sim, recorded, reply.status or 200, headers, plan)
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
        """A successful answer after the tier's latency, shaped by the reply's kind (see `Reply`)."""
        model, kind, sim = recorded.model or "gpt-sim", reply.kind, self.sim
        tier = reply.served_tier or served_tier(recorded.tier)
        usage = recorded.usage or payloads.Usage.estimate(len(recorded.body), options, reply.usage)
        await asyncio.sleep(options.latency_flex_s if tier == "flex" else options.latency_standard_s)
        count = options.stream_events if reply.events is None else reply.events
        partial = None
        if kind in ("cut_stream", "stall"):
            # Here `events` counts the deltas sent before the cut or stall; there is always more text left.
            partial = options.stream_events // 2 if reply.events is None else reply.events
            count = max(options.stream_events, partial + 1)
        if kind != "cut_stream":
            recorded.served_tier = tier
            sim.count(f"served_{tier}")
        pieces = payloads.text_pieces(count)
        status = reply.status or 200
        stall_s = (reply.delay_s or HANG_DEFAULT_S) if kind == "stall" else None

        if not recorded.stream or endpoint == COMPACT:
            store: Callable[[], None] | None = None
            if endpoint == COMPACT:
                data = payloads.compacted_response(model, tier, usage)
            elif endpoint == CHAT:
                data = payloads.chat_completion(model, tier, "".join(pieces), usage)
            else:
                item = payloads.message_item(payloads.new_id("msg_"), "".join(pieces), "completed")
                data = payloads.response_object(payloads.new_id("resp_"), model, tier, [item], usage)
                store = functools.partial(sim.store_response, data)
            response = wire.json_body(status, headers)
            cut = kind == "cut_stream"
            return await wire.body(
                request, sim, recorded, response, dump(data), cut=cut, stall_s=stall_s, on_usage=store
            )

        if endpoint == CHAT:
            include_usage = _include_usage(recorded.json)
            events = list(payloads.chat_chunks(model, tier, pieces, usage, include_usage))
            usage_event = events[-2] if include_usage else None
            store = None
        else:
            pairs = list(payloads.response_events(model, recorded.tier, tier, pieces, usage))
            events = list(payloads.numbered(iter(pairs)))
            usage_event = events[-1]
            store = functools.partial(sim.store_response, pairs[-1][1]["response"])
        events, usage_at = shapes.success(endpoint, kind, events, usage_event, count)
        at = None if partial is None else shapes.PRELUDE[endpoint] + partial
        plan = StreamPlan(
            [shapes.frame(event, reply.separator) for event in events],
            interval_s=options.event_interval_s if reply.event_interval_s is None else reply.event_interval_s,
            first_delay_s=reply.delay_s if kind == "slow_first_token" else 0.0,
            cut_after=at if kind == "cut_stream" else None,
            stall_after=at if kind == "stall" else None,
            stall_s=stall_s or 0.0,
            usage_at=usage_at,
            on_usage=store,
            close_after=kind == "no_done",
        )
        return await wire.stream(request, sim, recorded, status, headers, plan)


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
