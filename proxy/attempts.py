"""One model request's attempts upstream: through the flex gate, under the retry policy, until there is an
answer to relay or a final error. Each attempt is read just far enough to know which of the two it is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

from . import policy
from .accounting import Record
from .errors import DeadlineExceeded, FlexBusy, UpstreamError, UpstreamTimeout
from .gate import FlexGate, Pass, Result
from .metrics import status_class, tier_label
from .policy import Limits, Outcome, Progress, Step
from .rewrite import DROP, Body
from .services import Services
from .streaming import SSEDecoder, StreamState, json_object
from .tiers import TierDecision
from .upstream import UpstreamResponse


@dataclass
class Job:
    """What the attempts of one model request need."""

    rec: Record
    body: Body
    changes: dict[str, Any]
    decision: TierDecision
    limits: Limits
    headers: CIMultiDict[str]
    path: str
    family: str  # the model family: whose gate and whose observations
    gate: FlexGate | None
    standard_tier: str = "auto"  # the standard re-send's tier: auto, default, or omit (drop the member)
    strip_usage: bool = False
    expect_usage: bool = False


@dataclass
class OpenStream:
    """A 200 event stream whose first events have been read but not yet sent."""

    decoder: SSEDecoder
    state: StreamState
    pending: list[bytes]
    chunks: AsyncGenerator[bytes, None]


@dataclass
class Answer:
    """An upstream answer, read far enough to relay: the whole body, or a stream's opening events."""

    response: UpstreamResponse
    outcome: Outcome
    data: bytes = b""
    stream: OpenStream | None = None
    flex_pass: Pass | None = field(default=None, repr=False)  # freed once the answer is relayed

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.chunks.aclose()
        self.response.close()
        if self.flex_pass is not None:
            self.flex_pass.done()
            self.flex_pass = None


class Attempts:
    """Runs one job's attempts; `run()` returns the answer to relay or raises the final UpstreamError."""

    def __init__(self, services: Services, job: Job) -> None:
        self.s = services
        self.job = job
        self.progress = Progress()
        self.on_flex = job.decision.on_flex

    async def run(self) -> Answer:
        s, job, limits, progress = self.s, self.job, self.job.limits, self.progress
        rec, m, clock = job.rec, s.metrics, s.clock
        model_label = m.model_label(rec.model)
        last_429: Answer | None = None  # the last flex 429, kept to answer with if flex never opens in time
        last_sent: float | None = None
        while True:
            flex_pass: Pass | None = None
            if self.on_flex:
                flex_pass = await self._admit()
                if flex_pass is None:
                    action = policy.after_flex_wait(limits, clock())
                    if action.step is Step.FALLBACK:
                        self._fall_back(model_label)
                        continue
                    if last_429 is not None:
                        return last_429
                    raise FlexBusy("Flex capacity stayed unavailable for as long as this request could wait.")
            rec.attempts += 1
            if self.on_flex:
                progress.flex_attempts += 1
            tier = job.changes.get("service_tier", job.decision.tier)
            tier_name = tier_label(None if tier is DROP else tier)
            if last_sent is not None and clock() - last_sent < limits.min_backoff_s:
                # Never two attempts of one request closer than the minimum gap, whoever let this one go.
                await s.sleep(limits.min_backoff_s - (clock() - last_sent))
            sent_at = last_sent = clock()
            try:
                result = await self._attempt(tier_name, sent_at)
            except BaseException:
                m.attempts.labels(rec.endpoint, tier_name, "cancelled").inc()  # the client left mid-attempt
                if flex_pass is not None:
                    flex_pass.done()
                raise
            now = clock()
            if isinstance(result, UpstreamError):
                outcome = policy.classify_failure(result, limits)
                if outcome in _MAYBE_ACCEPTED:
                    rec.unread += 1
                retry_after = None
                m.attempts.labels(rec.endpoint, tier_name, result.status_class).inc()
            else:
                outcome = result.outcome
                retry_after = policy.retry_after_s(result.response.headers)
                m.attempts.labels(rec.endpoint, tier_name, status_class(result.response.status)).inc()
            self._observe(outcome, flex_pass, sent_at, now, retry_after)
            action = policy.next_action(
                outcome,
                on_flex=self.on_flex,
                managed=job.decision.managed,
                progress=progress,
                limits=limits,
                now=now,
                # With the gate, the gate honours a flex 429's retry-after for the whole pool.
                retry_after=None if job.gate is not None and outcome is Outcome.FLEX_UNAVAILABLE else retry_after,
                rand=s.rand(),
            )
            if action.step is Step.ANSWER:
                if last_429 is not None:
                    await last_429.close()
                if isinstance(result, UpstreamError):
                    if flex_pass is not None:
                        flex_pass.done()
                    raise result
                result.flex_pass = flex_pass
                return result
            if flex_pass is not None:
                flex_pass.done()
            if isinstance(result, Answer):
                if outcome is Outcome.FLEX_UNAVAILABLE:
                    if last_429 is not None:
                        await last_429.close()
                    result.response.close()  # its body is read: the 429 can still be answered with
                    last_429 = result
                else:
                    await result.close()
            await self._next(action, outcome, model_label)

    async def _next(self, action: policy.Action, outcome: Outcome, model_label: str) -> None:
        """Carry out a retry, a tier drop or a fallback, waiting first where the policy says."""
        s, job, rec = self.s, self.job, self.job.rec
        m = s.metrics
        if action.step is Step.DROP_TIER:
            self.progress.tier_rejected = True
            m.tier_rejections.labels(rec.endpoint, model_label).inc()
            job.changes["service_tier"] = DROP
            self.on_flex = False
        elif action.step is Step.FALLBACK:
            self._fall_back(model_label)
        else:
            if outcome is not Outcome.FLEX_UNAVAILABLE:
                self.progress.retries += 1
            m.retries.labels(rec.endpoint, model_label, action.reason or "other").inc()
            if self.on_flex and outcome is Outcome.FLEX_UNAVAILABLE and job.gate is not None:
                return  # the gate decides when this request tries flex again
        if action.delay > 0:
            started = s.clock()
            await s.sleep(action.delay)
            waited = s.clock() - started  # what happened, not what was planned
            m.backoff.labels(rec.endpoint).observe(waited)
            rec.backoff_s += waited

    def _fall_back(self, model_label: str) -> None:
        s, job = self.s, self.job
        job.rec.fell_back = True
        s.metrics.fallbacks.labels(job.rec.endpoint, model_label).inc()
        job.changes["service_tier"] = DROP if job.standard_tier == "omit" else job.standard_tier
        self.on_flex = False

    async def _admit(self) -> Pass | None:
        """Leave to try flex now, or after waiting in the gate; None when the request should not try flex."""
        job, limits, progress = self.job, self.job.limits, self.progress
        gate = job.gate
        if gate is None:
            return _NO_GATE  # flex retries then wait by the policy's own backoff
        flex_pass = gate.try_pass()
        if flex_pass is not None:
            return flex_pass
        if limits.strategy == "standard":
            return None  # standard does not wait for flex: it goes to the standard tier at once
        if limits.strategy == "fail":
            return gate.force_pass()  # tries flex once whatever the gate says, and answers what came
        if progress.flex_attempts >= limits.max_flex_attempts:
            return None
        started = self.s.clock()
        flex_pass = await gate.wait(limits.flex_deadline, progress.flex_attempts)
        waited = max(0.0, flex_pass.waited_s if flex_pass is not None else self.s.clock() - started)
        self.s.metrics.gate_wait.labels(gate.key).observe(waited)
        job.rec.gate_wait_s += waited
        return flex_pass

    def _observe(
        self, outcome: Outcome, flex_pass: Pass | None, sent_at: float, now: float, retry: float | None
    ) -> None:
        """Tell the gate and the observations what this attempt found."""
        s, job = self.s, self.job
        if self.on_flex:
            busy = outcome is Outcome.FLEX_UNAVAILABLE
            s.observed.flex_attempt(job.family, now, busy)
            if flex_pass is not None:
                result = Result.BUSY if busy else Result.OK if outcome is Outcome.OK else Result.ERROR
                flex_pass.record(result, now, retry, s.rand(), now - sent_at)
        elif outcome is Outcome.OK:
            s.observed.standard_answer(job.family, now - sent_at)

    async def _attempt(self, tier_name: str, sent_at: float) -> Answer | UpstreamError:
        """One attempt, bounded by the tier's time to first byte and the request's deadline."""
        s, job = self.s, self.job
        rec, limits = job.rec, job.limits
        tier_timeout = s.settings.first_byte_timeout_s(self.on_flex)
        wait = min(tier_timeout, limits.deadline - sent_at)
        response: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(max(0.0, wait)):
                response = await s.upstream.send("POST", job.path, job.headers, job.body.render_parts(job.changes))
                if response.status < 400:
                    s.metrics.ttfb.labels(rec.endpoint, tier_name).observe(s.clock() - sent_at)
                if response.status >= 400 or not rec.stream or not _is_sse(response):
                    data = await response.read()
                    error = _error_object(data) if response.status >= 400 else None
                    outcome = policy.classify(response.status, error, on_flex=self.on_flex)
                    return Answer(response, outcome, data)
                stream = await self._open_stream(response)
                error = stream.state.error
                outcome = policy.classify_stream_error(error, on_flex=self.on_flex) if error else Outcome.OK
                return Answer(response, outcome, stream=stream)
        except TimeoutError:
            if response is not None:
                response.close()
            elapsed = s.clock() - sent_at
            if wait < tier_timeout and limits.client_deadline:
                return DeadlineExceeded("No answer came before this request's deadline.", elapsed_s=elapsed)
            return UpstreamTimeout(
                f"The upstream API did not start its answer within {wait:g} s.", elapsed_s=elapsed
            )
        except UpstreamError as exc:
            if response is not None:
                response.close()
            return exc
        except BaseException:
            # The client left (or the proxy is stopping): close the upstream request now, which for a stream
            # is what stops the generation, rather than leave the connection to finish on its own. Upstream may
            # have accepted the work already.
            rec.unread += 1
            if response is not None:
                response.close()
            raise

    async def _open_stream(self, response: UpstreamResponse) -> OpenStream:
        """Read until an event says the work is under way, so an error before it can still be retried."""
        job = self.job
        decoder = SSEDecoder()
        state = StreamState("chat" if job.rec.endpoint == "chat" else "responses", job.strip_usage, job.expect_usage)
        chunks = response.chunks()
        pending: list[bytes] = []
        try:
            async for chunk in chunks:
                for event in decoder.feed(chunk):
                    pending.append(state.take(event))
                if state.committed:
                    break
        except BaseException:
            await chunks.aclose()
            raise
        return OpenStream(decoder, state, pending, chunks)


_NO_GATE = Pass(None, None, 0.0)  # for when the gate is switched off
# Failures after which upstream may have accepted, and billed, the work.
_MAYBE_ACCEPTED = frozenset({Outcome.TIMEOUT, Outcome.DEADLINE, Outcome.DROPPED, Outcome.INCOMPLETE})


def _is_sse(response: UpstreamResponse) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def _error_object(data: bytes) -> dict[str, Any] | None:
    obj = json_object(data)
    error = obj.get("error") if obj else None
    return error if isinstance(error, dict) else None
