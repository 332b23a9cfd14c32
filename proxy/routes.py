"""The per-request pipeline, one step per module: body → tier (tiers) → limits (policy) → gate and attempts
(attempts) → relay (relay) → account (accounting). Every other /v1 path is passed through unchanged."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from typing import Any
from urllib.parse import unquote

from . import policy, tiers
from .accounting import Record, account
from .asgi import (
    ClientGone,
    DisconnectGuard,
    Receive,
    Responder,
    ResponseAborted,
    Scope,
    Send,
    header,
    headers_of,
    raw_path,
    read_body,
)
from .attempts import Attempts, Job
from .errors import ClientError, FlexProxyError, ShuttingDown, SpendCapReached, Unauthorized, UpstreamError
from .ledger import utc_day
from .passthrough import passthrough, query
from .relay import deliver, retry_after_header
from .rewrite import parse, with_usage
from .services import Services
from .spend import Verdict
from .upstream import request_headers

LOG = logging.getLogger("flex_proxy")
MODEL_ENDPOINTS = {"/chat/completions": "chat", "/responses": "responses", "/responses/compact": "compact"}


class ProxyApp:
    """ASGI app for /v1/..."""

    def __init__(self, services: Services) -> None:
        self.s = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = raw_path(scope)
        # What follows /v1, escapes as the client sent them; uvicorn routed on the decoded path, so a prefix that
        # only decodes to /v1/ (`/v%31/`, `/v1%2F`) is refused below rather than cut at the wrong place.
        rest = raw[3:] if raw.startswith("/v1/") else raw
        endpoint = MODEL_ENDPOINTS.get(rest) if scope["method"] == "POST" else None
        client = scope.get("client")
        record = Record(endpoint or "other", scope["method"], rest, peer=client[0] if client else None)
        s = self.s
        guard = DisconnectGuard(receive)
        responder = Responder(send, guard, functools.partial(self._settle, record, s.clock()))
        s.metrics.in_flight.labels(record.endpoint).inc()
        current = asyncio.current_task()
        # The pipeline runs in this task (uvicorn's, one per request), which the guard cancels if the client leaves:
        # no second task per request.
        guard.watch(current)
        try:
            await self._serve(scope, receive, record, responder, guard, raw.startswith("/v1/"))
        except ResponseAborted:
            raise  # after accounting in `finally`: uvicorn drops the connection, as it must
        except asyncio.CancelledError:
            guard.disarm()  # what follows may still answer: a client leaving now must not cancel that answer
            if guard.fired:
                # Our own cancel: taken back (Python 3.11 counts it), and the request ends here as before.
                if current is not None:
                    current.uncancel()
                record.outcome = "client_disconnected"
            else:
                # uvicorn cancels what still runs when its graceful-shutdown time is up: answer in OpenAI's shape
                # rather than let it send a plain-text 500 (which the SDK would re-send). Python 3.11: uncancel, so
                # the answer below is not cancelled too.
                if current is not None:
                    current.uncancel()
                await _shutting_down(responder, record)
        except Exception:
            # A bug of ours: the client still gets an OpenAI-shaped answer, and the proxy keeps serving.
            guard.disarm()
            LOG.exception("unexpected error while serving %s %r", record.method, record.path)
            record.outcome = "proxy_error"
            record.status = 500
            await responder.error(FlexProxyError("The proxy failed to handle this request."), record.flex_headers())
        finally:
            guard.disarm()
            responder.settle()

    def _settle(self, record: Record, start: float, error_id: str | None) -> None:
        """The request is over (or its last byte is about to go): count it, price it, log it."""
        s = self.s
        record.error_id = error_id
        s.metrics.in_flight.labels(record.endpoint).dec()
        now = s.wall()
        duration = s.clock() - start
        account(record, duration, s.metrics, s.prices, s.access_log, s.spend, s.ledger, utc_day(now), now)

    async def _serve(
        self, scope: Scope, receive: Receive, rec: Record, out: Responder, guard: DisconnectGuard, prefixed: bool
    ) -> None:
        try:
            if not prefixed:
                raise ClientError("The request path must begin with /v1/ as written, not escaped.", code="invalid_path")
            check_path(rec.path)
            caller = self.s.auth.authorize(header(scope, b"authorization"))
        except ClientError as exc:
            await _refuse(out, rec, exc)
            return
        rec.client = caller.name
        if rec.endpoint == "other":
            timeout = self.s.settings.first_byte_timeout_s(on_flex=False)
            await passthrough(self.s.upstream, scope, receive, rec, out, guard, caller.authorization, timeout)
        else:
            await self._model_request(scope, receive, rec, out, guard, caller.authorization)

    async def _model_request(
        self,
        scope: Scope,
        receive: Receive,
        rec: Record,
        out: Responder,
        guard: DisconnectGuard,
        authorization: str | None,
    ) -> None:
        services = self.s
        s = services.settings
        given = headers_of(scope)
        try:
            raw = await read_body(receive, s.max_body_bytes, given.get("content-length"))
            body = parse(raw)
            mode = tiers.header_mode(given.get("x-flex-tier"))
            model = body.get("model")
            rec.model = model if isinstance(model, str) else None
            chosen = services.policies.select(rec.client, rec.model, given.get("x-flex-policy"))
            strategy = policy.parse_strategy(given.get("x-flex-on-unavailable"), chosen.strategy)
            stated = policy.parse_deadline(given.get("x-flex-deadline-s"))
            upstream_headers = request_headers(scope["headers"], authorization)
        except ClientGone:
            rec.outcome = "client_disconnected"
            return
        except ClientError as exc:
            await _refuse(out, rec, exc)
            return
        guard.arm()
        rec.policy = chosen.name
        rec.stream = body.get("stream") is True
        decision = tiers.decide(
            model=model,
            client_tier=body.get("service_tier"),
            background=body.get("background") is True,
            header=mode,
            patterns=s.flex_models,
            override_client_tier=s.override_client_tier,
            inject_background=s.inject_background,
            policy_flex=chosen.flex,
        )
        if s.mode == "shadow":  # forward exactly as sent; only count what flex would have saved
            rec.shadow_eligible = decision.on_flex and decision.managed
            client_tier = body.get("service_tier")
            decision = tiers.TierDecision(client_tier if isinstance(client_tier, str) else None, False, "shadow")
            mode = "off"
        cap = services.policies.client(rec.client).standard_spend_cap_usd
        family = services.metrics.model_label(rec.model, rec.endpoint)  # bounded: a known family, `other` or `none`
        rec.spend = services.spend.tab(rec.client, cap, family)
        if decision.on_flex and services.spend.over(rec.client, cap):
            strategy = "backoff"  # past the day's standard spend: stay on flex, wait or fail, never pay standard
        rec.requested_tier = decision.tier
        rec.tier_reason = decision.reason
        changes: dict[str, Any] = {}
        if decision.managed:
            changes["service_tier"] = decision.tier
        strip_usage = expect_usage = False
        if rec.stream and rec.endpoint == "chat":
            options = body.get("stream_options")
            expect_usage = isinstance(options, dict) and options.get("include_usage") is True
            # off: the body goes as it came, except for a capped client, whose standard spend must be priced.
            as_sent = mode == "off" and (cap is None or s.mode == "shadow")
            asked = None if expect_usage or as_sent else with_usage(body)
            if asked is not None:
                # Ask for usage so the answer can be priced; the extra chunk is taken out again on the way back.
                changes["stream_options"] = asked
                strip_usage = expect_usage = True
        client_wait = policy.client_wait_s(
            given.get("x-stainless-read-timeout"), given.get("x-stainless-timeout"), stated
        )
        reserve = services.observed.reserve(family, rec.stream)
        limits = policy.limits_for(s, strategy, services.clock(), client_wait, reserve, chosen)
        # The first send goes on the standard tier: the cap is checked (and the send's cost held) before it. Near the
        # cap it waits for the client's sends in flight to be priced, while its deadline allows.
        wait_s = limits.deadline - services.clock() - reserve
        if not decision.on_flex and not await rec.spend.allowed(wait_s, services.clock):
            over = rec.spend.verdict is Verdict.OVER
            retry = services.spend.seconds_to_midnight() if over else 1
            await _refuse(out, rec, SpendCapReached(rec.client, cap, pending=not over), retry)
            return
        gate = None
        if services.gates is not None and decision.on_flex:
            gate = services.gates.get(_gate_key(family, authorization, s.gate_scope))
        job = Job(
            rec=rec,
            body=body,
            changes=changes,
            decision=decision,
            limits=limits,
            headers=upstream_headers,
            path=rec.path + query(scope),
            family=family,
            gate=gate,
            standard_tier=chosen.standard_tier,
            strip_usage=strip_usage,
            expect_usage=expect_usage,
        )
        try:
            answer = await Attempts(services, job).run()
        except SpendCapReached as exc:  # a fallback the client's cap forbids, and no flex 429 to answer with
            over = rec.spend.verdict is Verdict.OVER
            await _refuse(out, rec, exc, services.spend.seconds_to_midnight() if over else 1)
            return
        except UpstreamError as exc:
            rec.outcome = exc.outcome
            rec.status = exc.status
            extra = [(b"retry-after", retry_after_header(None, limits))] if exc.status == 429 else []
            await out.error(exc, rec.flex_headers() + extra)
            return
        try:
            await deliver(rec, out, answer, limits, services.prices, s.stream_idle_timeout_s)
        finally:
            await answer.close()


def check_path(path: str) -> None:
    """Refuse a path that could leave /v1/ upstream: a dot segment, plain or escaped (even twice), or a
    backslash standing in for a slash."""
    if "." not in path and "%" not in path:
        return  # no dot, plain or escaped: no dot segment (the common case, checked at once)
    decoded = path
    for _ in range(3):
        if any(part in (".", "..") for part in decoded.replace("\\", "/").split("/")):
            raise ClientError("The request path may not contain '.' or '..' segments.", code="invalid_path")
        if "%" not in decoded:
            return
        decoded = unquote(decoded, errors="replace")


def _gate_key(family: str, authorization: str | None, scope: str) -> str:
    if scope == "model" or not authorization:
        return family
    # Per upstream key: a fingerprint, never the key itself, so the key cannot reach a label or a log.
    return family + "@" + hashlib.sha256(authorization.encode()).hexdigest()[:8]


async def _refuse(out: Responder, rec: Record, exc: ClientError, retry_after: int | None = None) -> None:
    if isinstance(exc, Unauthorized):
        rec.outcome = "auth_failed"  # no client named: the label stays `none`, a name no client may take
    else:
        rec.outcome = "bad_request" if retry_after is None else "spend_cap"
    rec.status = exc.status
    extra = [] if retry_after is None else [(b"retry-after", str(retry_after).encode())]
    await out.error(exc, rec.flex_headers() + extra)


async def _shutting_down(out: Responder, rec: Record) -> None:
    """The proxy stops before this answer came: a 503 that says whether a re-send is safe (nothing reached
    upstream: another replica can take it), or the stream's own error event."""
    rec.outcome = "shutdown"
    message = "The proxy is shutting down and stopped this request before its answer was complete."
    if out.started:
        if out.error_event is None:
            raise ResponseAborted  # a whole answer half sent: only dropping the connection is honest
        await out.write(out.error_event(message, ShuttingDown.code))
        await out.finish()
        return
    rec.status = ShuttingDown.status
    # A model request's attempt cut in flight counts as unread (as does any upstream took and nobody read); a
    # pass-through sent at all may have been done (an upload, a batch).
    accepted = rec.unread > 0 or (rec.endpoint == "other" and rec.attempts > 0)
    if accepted:
        message += " Upstream may have done the work already; sending it again may pay for it twice."
    await out.error(ShuttingDown(message), rec.flex_headers(), retry=not accepted)
