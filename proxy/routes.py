"""The per-request pipeline: read body → decide tier → rewrite → attempt under the retry policy →
relay or stream → account. Every other /v1 path is passed through unchanged."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from . import policy, tiers
from .accounting import Record, account
from .asgi import ClientGone, DisconnectGuard, Receive, Responder, Scope, Send, header, read_body
from .auth import authorize
from .config import Settings
from .errors import ClientError, FlexProxyError, UpstreamError, UpstreamTimeout
from .logs import AccessLog
from .metrics import Metrics, status_class, tier_label
from .passthrough import passthrough, query
from .policy import Outcome, Progress, Step
from .pricing import PriceTable, usage_from
from .rewrite import DROP, Body, Parts, parse
from .streaming import SSEDecoder, StreamState, json_object
from .upstream import Upstream, UpstreamResponse, request_headers, response_headers

LOG = logging.getLogger("flex_proxy")
MODEL_ENDPOINTS = {"/chat/completions": "chat", "/responses": "responses", "/responses/compact": "compact"}


@dataclass
class Services:
    """What the pipeline needs from the app; clock, sleep and rand are seams for tests."""

    settings: Settings
    upstream: Upstream
    metrics: Metrics
    prices: PriceTable
    access_log: AccessLog
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rand: Callable[[], float] = random.random


@dataclass
class OpenStream:
    """A 200 event stream whose first events have been read but not yet sent."""

    decoder: SSEDecoder
    state: StreamState
    pending: list[bytes]
    chunks: AsyncGenerator[bytes, None]


class ProxyApp:
    """ASGI app mounted at /v1."""

    def __init__(self, services: Services) -> None:
        self.s = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        rest = path[3:] if path.startswith("/v1") else path
        endpoint = MODEL_ENDPOINTS.get(rest) if scope["method"] == "POST" else None
        record = Record(endpoint or "other", scope["method"], rest)
        s = self.s
        start = s.clock()
        settled = False

        def settle() -> None:
            nonlocal settled
            if not settled:
                settled = True
                s.metrics.in_flight.labels(record.endpoint).dec()
                account(record, s.clock() - start, s.metrics, s.prices, s.access_log)

        guard = DisconnectGuard(receive)
        responder = Responder(send, guard, settle)
        s.metrics.in_flight.labels(record.endpoint).inc()
        try:
            work = asyncio.get_running_loop().create_task(self._serve(scope, receive, record, responder, guard))
            guard.watch(work)
            await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not guard.fired or (current is not None and current.cancelling()):
                raise
            record.outcome = "client_disconnected"
        except Exception:
            # A bug of ours: the client still gets an OpenAI-shaped answer, and the proxy keeps serving.
            LOG.exception("unexpected error while serving %s %s", record.method, record.path)
            record.outcome = "proxy_error"
            record.status = 500
            await responder.error(FlexProxyError("The proxy failed to handle this request."), record.flex_headers())
        finally:
            guard.disarm()
            settle()

    async def _serve(self, scope: Scope, receive: Receive, rec: Record, out: Responder, guard: DisconnectGuard) -> None:
        try:
            authorization = authorize(self.s.settings, header(scope, b"authorization"))
        except ClientError as exc:
            await _refuse(out, rec, exc)
            return
        if rec.endpoint == "other":
            await passthrough(self.s.upstream, scope, receive, rec, out, guard, authorization)
        else:
            await self._model_request(scope, receive, rec, out, guard, authorization)

    async def _model_request(
        self,
        scope: Scope,
        receive: Receive,
        rec: Record,
        out: Responder,
        guard: DisconnectGuard,
        authorization: str | None,
    ) -> None:
        s = self.s.settings
        try:
            raw = await read_body(receive, s.max_body_bytes, header(scope, b"content-length"))
            body = parse(raw)
            mode = tiers.header_mode(header(scope, b"x-flex-tier"))
            strategy = policy.parse_strategy(header(scope, b"x-flex-on-unavailable"), s.on_unavailable)
        except ClientGone:
            rec.outcome = "client_disconnected"
            return
        except ClientError as exc:
            await _refuse(out, rec, exc)
            return
        guard.arm()
        model = body.get("model")
        rec.model = model if isinstance(model, str) else None
        rec.stream = body.get("stream") is True
        decision = tiers.decide(
            model=model,
            client_tier=body.get("service_tier"),
            background=body.get("background") is True,
            header=mode,
            patterns=s.flex_models,
            override_client_tier=s.override_client_tier,
            inject_background=s.inject_background,
        )
        rec.requested_tier = decision.tier
        rec.tier_reason = decision.reason
        changes: dict[str, Any] = {}
        if decision.managed:
            changes["service_tier"] = decision.tier
        strip_usage = False
        if rec.stream and rec.endpoint == "chat":
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # Ask for usage so the answer can be priced; the extra chunk is taken out again on the way back.
                changes["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                strip_usage = True
        headers = request_headers(scope["headers"], authorization)
        limits = policy.limits_for(s, strategy, self.s.clock(), header(scope, b"x-stainless-read-timeout"))
        try:
            path = rec.path + query(scope)
            await self._attempts(rec, out, body, changes, decision, limits, headers, path, strip_usage)
        except UpstreamError as exc:
            rec.outcome = exc.outcome
            rec.status = exc.status
            await out.error(exc, rec.flex_headers())

    async def _attempts(
        self,
        rec: Record,
        out: Responder,
        body: Body,
        changes: dict[str, Any],
        decision: tiers.TierDecision,
        limits: policy.Limits,
        headers: CIMultiDict[str],
        path: str,
        strip_usage: bool,
    ) -> None:
        s, m, clock = self.s.settings, self.s.metrics, self.s.clock
        progress = Progress()
        on_flex = decision.on_flex
        model_label = m.model_label(rec.model)
        response: UpstreamResponse | None = None
        stream: OpenStream | None = None
        try:
            while True:
                rec.attempts += 1
                if on_flex:
                    progress.flex_attempts += 1
                tier = changes.get("service_tier", decision.tier)
                tier_name = tier_label(None if tier is DROP else tier)
                response, stream, failure, data, outcome = await self._attempt(
                    rec, body.render_parts(changes), headers, path, limits, strip_usage, on_flex, tier_name
                )
                status = None if response is None else response.status
                m.attempts.labels(rec.endpoint, tier_name, status_class(status, _failure_class(failure))).inc()
                action = policy.next_action(
                    outcome,
                    on_flex=on_flex,
                    managed=decision.managed,
                    progress=progress,
                    limits=limits,
                    now=clock(),
                    retry_after=None if response is None else policy.retry_after_s(response.headers),
                    rand=self.s.rand(),
                )
                if action.step is Step.ANSWER:
                    break
                await _discard(response, stream)
                if action.step is Step.DROP_TIER:
                    progress.tier_rejected = True
                    m.tier_rejections.labels(rec.endpoint, model_label).inc()
                    changes["service_tier"] = DROP
                    on_flex = False
                elif action.step is Step.FALLBACK:
                    rec.fell_back = True
                    m.fallbacks.labels(rec.endpoint, model_label).inc()
                    changes["service_tier"] = DROP if s.standard_tier == "omit" else s.standard_tier
                    on_flex = False
                else:
                    if outcome is not Outcome.FLEX_UNAVAILABLE:
                        progress.retries += 1
                    m.retries.labels(rec.endpoint, model_label, action.reason or "other").inc()
                if action.delay > 0:
                    m.backoff.labels(rec.endpoint).observe(action.delay)
                    rec.backoff_s += action.delay
                    await self.s.sleep(action.delay)
            if response is None:
                assert failure is not None
                raise failure
            await self._deliver(rec, out, response, outcome, data, stream, limits)
        finally:
            await _discard(response, stream)

    async def _attempt(
        self,
        rec: Record,
        payload: Parts,
        headers: CIMultiDict[str],
        path: str,
        limits: policy.Limits,
        strip_usage: bool,
        on_flex: bool,
        tier_name: str,
    ) -> tuple[UpstreamResponse | None, OpenStream | None, UpstreamError | None, bytes, Outcome]:
        """One upstream attempt, read far enough to know whether it can be answered or must be retried."""
        clock = self.s.clock
        sent_at = clock()
        response: UpstreamResponse | None = None
        try:
            response = await self.s.upstream.send("POST", path, headers, payload, timeout_s=limits.deadline - sent_at)
            self.s.metrics.ttfb.labels(rec.endpoint, tier_name).observe(clock() - sent_at)
            if response.status >= 400 or not rec.stream or not _is_sse(response):
                data = await response.read()
                error = _error_object(data) if response.status >= 400 else None
                return response, None, None, data, policy.classify(response.status, error, on_flex=on_flex)
            stream = await self._first_events(rec, response, strip_usage)
            error = stream.state.error
            outcome = policy.classify_stream_error(error, on_flex=on_flex) if error else Outcome.OK
            return response, stream, None, b"", outcome
        except UpstreamError as exc:
            if response is not None:
                response.close()
            outcome = Outcome.TIMEOUT if isinstance(exc, UpstreamTimeout) else Outcome.CONNECTION
            return None, None, exc, b"", outcome

    async def _first_events(
        self, rec: Record, response: UpstreamResponse, strip_usage: bool
    ) -> OpenStream:
        """Read until the stream's first event, so an error there can still be retried."""
        decoder = SSEDecoder()
        state = StreamState("chat" if rec.endpoint == "chat" else "responses", strip_usage)
        chunks = response.chunks()
        pending: list[bytes] = []
        async for chunk in chunks:
            for event in decoder.feed(chunk):
                pending.append(state.take(event))
            if pending:
                break
        return OpenStream(decoder, state, pending, chunks)

    async def _deliver(
        self,
        rec: Record,
        out: Responder,
        response: UpstreamResponse,
        outcome: Outcome,
        data: bytes,
        stream: OpenStream | None,
        limits: policy.Limits,
    ) -> None:
        try:
            rec.request_id = response.headers.get("x-request-id")
            rec.status = response.status
            headers = response_headers(response.headers)
            if stream is not None:
                await self._relay(rec, out, response, headers, stream)
                return
            if response.status >= 400:
                rec.outcome = outcome.value if outcome is not Outcome.OK else "upstream_error"
                extra = [(b"x-should-retry", b"false")]
                if response.status == 429 and "retry-after" not in response.headers:
                    extra.append((b"retry-after", str(policy.suggested_wait_s(limits)).encode()))
                await out.whole(response.status, headers + extra + rec.flex_headers(), data)
                return
            answer = json_object(data)
            if answer is not None:
                tier = answer.get("service_tier")
                rec.served_tier = tier if isinstance(tier, str) else None
                rec.usage = usage_from(answer)
            await out.whole(response.status, headers + rec.flex_headers(), data)
        finally:
            response.close()

    async def _relay(
        self,
        rec: Record,
        out: Responder,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        stream: OpenStream,
    ) -> None:
        """Send the stream on event by event; a cut upstream ends it with an error event, never silently."""
        state = stream.state
        rec.served_tier = state.served_tier
        await out.start(response.status, headers + rec.flex_headers())
        try:
            await out.write(b"".join(stream.pending))
            if not state.finished:
                async for chunk in stream.chunks:
                    await out.write(b"".join(state.take(event) for event in stream.decoder.feed(chunk)))
            tail = stream.decoder.flush()
            if tail is not None:
                await out.write(state.take(tail))
        except UpstreamError as exc:
            rec.outcome = "stream_cut"
            await out.write(state.error_event(exc.message, exc.code or "upstream_error"))
        else:
            if not state.finished:
                rec.outcome = "stream_cut"
                message = "The upstream API ended the stream before its last event."
                await out.write(state.error_event(message, "stream_incomplete"))
            elif state.error is not None:
                rec.outcome = "upstream_error"
        finally:
            rec.served_tier = state.served_tier or rec.served_tier
            if state.usage_body is not None:
                rec.usage = usage_from(state.usage_body)
        await out.finish()


async def _refuse(out: Responder, rec: Record, exc: ClientError) -> None:
    rec.outcome = "bad_request"
    rec.status = exc.status
    await out.error(exc, rec.flex_headers())


async def _discard(response: UpstreamResponse | None, stream: OpenStream | None) -> None:
    if stream is not None:
        await stream.chunks.aclose()
    if response is not None:
        response.close()


def _is_sse(response: UpstreamResponse) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def _failure_class(failure: UpstreamError | None) -> str | None:
    if failure is None:
        return None
    return "timeout" if isinstance(failure, UpstreamTimeout) else "connection_error"


def _error_object(data: bytes) -> dict[str, Any] | None:
    obj = json_object(data)
    error = obj.get("error") if obj else None
    return error if isinstance(error, dict) else None


