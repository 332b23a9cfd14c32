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
from .errors import DeadlineExceeded, FlexBusy, SpendCapReached, UpstreamError, UpstreamTimeout
from .gate import FlexGate, Pass, Result
from .metrics import status_class, tier_label
from .policy import Limits, Outcome, Progress, Step
from .rewrite import DROP, Body
from .services import Services
from .spend import Verdict
from .streaming import SSEDecoder, StreamState, json_object
from .tiers import TierDecision
from .upstream import UpstreamResponse


@dataclass(slots=True)
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


@dataclass(slots=True)
class OpenStream:
    """A 200 event stream whose first events have been read but not yet sent."""

    decoder: SSEDecoder
    state: StreamState
    pending: list[bytes]
    chunks: AsyncGenerator[bytes, None]


@dataclass(slots=True)
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

    __slots__ = ("arrived", "flex_pass", "job", "last_429", "last_sent", "model_label", "on_flex", "progress", "s")

    def __init__(self, services: Services, job: Job) -> None:
        self.s = services
        self.job = job
        self.progress = Progress()
        self.on_flex = job.decision.on_flex
        self.arrived = services.clock()
        self.model_label = services.metrics.model_label(job.rec.model)
        self.flex_pass: Pass | None = None  # this attempt's leave from the gate; given back once, whatever happens
        self.last_429: Answer | None = None  # the last flex 429, to answer with if flex never opens in time
        self.last_sent: float | None = None

    async def run(self) -> Answer:
        limits, clock = self.job.limits, self.s.clock
        try:
            if self.on_flex and policy.no_room_for_flex(limits, clock()):
                self._fall_back()  # the deadline leaves no time to wait for flex: standard at once
            while True:
                if self.on_flex and not await self._admit():
                    if policy.after_flex_wait(limits, clock()).step is not Step.FALLBACK:
                        return self._out_of_time()
                    self._fall_back()
                if not self.on_flex and not await self._standard_allowed():
                    return self._out_of_time(capped=True)
                result, outcome, action = await self._try()
                if action.step is Step.ANSWER:
                    return self._final(result)
                await self._next(action, outcome, result)
        finally:
            self._give_back()

    async def _try(self) -> tuple[Answer | UpstreamError, Outcome, policy.Action]:
        """One attempt: sent no sooner than the minimum gap after the last, counted once it is over, and the
        policy's verdict on what it found."""
        s, job, limits = self.s, self.job, self.job.limits
        rec = job.rec
        if self.last_sent is not None and s.clock() - self.last_sent < limits.min_backoff_s:
            # Never two attempts of one request closer than the minimum gap, whoever let this one go.
            await s.sleep(limits.min_backoff_s - (s.clock() - self.last_sent))
        rec.attempts += 1
        if self.on_flex:
            self.progress.flex_attempts += 1
        tier = job.changes.get("service_tier", job.decision.tier)
        tier_name = tier_label(None if tier is DROP else tier)
        sent_at = self.last_sent = s.clock()
        try:
            result = await self._attempt(tier_name, sent_at)
        except BaseException:
            s.metrics.attempts.labels(rec.endpoint, tier_name, "cancelled").inc()  # the client left mid-attempt
            raise
        now = s.clock()
        if isinstance(result, UpstreamError):
            outcome, retry_after, status = policy.classify_failure(result, limits), None, result.status_class
            if outcome in _MAYBE_ACCEPTED:
                rec.unread += 1
        else:
            outcome, retry_after = result.outcome, policy.retry_after_s(result.response.headers)
            status = status_class(result.response.status)
        s.metrics.attempts.labels(rec.endpoint, tier_name, status).inc()
        self._observe(outcome, sent_at, now, retry_after)
        return result, outcome, self._decide(outcome, now, retry_after)

    def _decide(self, outcome: Outcome, now: float, retry_after: float | None) -> policy.Action:
        job, limits = self.job, self.job.limits
        if self.on_flex and outcome is Outcome.FLEX_UNAVAILABLE and job.gate is not None:
            return policy.after_gate_refusal(limits, now, retry_after)  # the gate's own small policy
        return policy.next_action(
            outcome,
            on_flex=self.on_flex,
            managed=job.decision.managed,
            progress=self.progress,
            limits=limits,
            now=now,
            retry_after=retry_after,
            rand=self.s.rand(),
        )

    def _final(self, result: Answer | UpstreamError) -> Answer:
        """The policy says answer: an error is raised, an answer keeps its pass until it has been relayed."""
        self.last_429 = None
        if isinstance(result, UpstreamError):
            raise result
        result.flex_pass, self.flex_pass = self.flex_pass, None
        return result

    def _out_of_time(self, capped: bool = False) -> Answer:
        """Flex did not open up in time and the strategy does not fall back, or the client's standard spend cap
        forbids the fallback: the last flex 429, else ours (or the cap's)."""
        answer, self.last_429 = self.last_429, None
        if answer is not None:
            return answer
        if capped:
            tab = self.job.rec.spend
            cap = tab.cap / 1e9 if tab is not None and tab.cap is not None else None
            raise SpendCapReached(self.job.rec.client, cap, pending=tab is not None and tab.verdict is not Verdict.OVER)
        raise FlexBusy("Flex capacity stayed unavailable for as long as this request could wait.")

    async def _standard_allowed(self) -> bool:
        """Before every standard-tier send (the first, a fallback, a re-send after a tier rejection): the client's
        daily spend cap, counted across the fleet, with this send's cost held; near the cap it waits for the
        client's sends in flight to be priced, while its deadline allows."""
        tab, limits, clock = self.job.rec.spend, self.job.limits, self.s.clock
        if tab is None:
            return True
        return await tab.allowed(limits.deadline - clock() - limits.standard_reserve_s, clock)

    async def _next(self, action: policy.Action, outcome: Outcome, result: Answer | UpstreamError) -> None:
        """Close this attempt, then carry out a wait in the gate, a retry, a tier drop or a fallback, sleeping
        first where the policy says."""
        self._give_back()
        if isinstance(result, Answer):
            if outcome is Outcome.FLEX_UNAVAILABLE:
                result.response.close()  # its body is read: the 429 can still be answered with
                self.last_429 = result
            else:
                await result.close()
        s, rec = self.s, self.job.rec
        m = s.metrics
        if action.step is Step.DROP_TIER:
            self.progress.tier_rejected = True
            m.tier_rejections.labels(rec.endpoint, self.model_label).inc()
            self.job.changes["service_tier"] = DROP
            self.on_flex = False
        elif action.step is Step.FALLBACK:
            self._fall_back()
        else:
            if outcome is not Outcome.FLEX_UNAVAILABLE:
                self.progress.retries += 1
            m.retries.labels(rec.endpoint, self.model_label, action.reason or "other").inc()
        if action.delay > 0:
            started = s.clock()
            await s.sleep(action.delay)
            waited = s.clock() - started  # what happened, not what was planned
            m.backoff.labels(rec.endpoint).observe(waited)
            rec.backoff_s += waited

    def _give_back(self) -> None:
        flex_pass, self.flex_pass = self.flex_pass, None
        if flex_pass is not None:
            flex_pass.done()

    def _fall_back(self) -> None:
        s, job = self.s, self.job
        job.rec.fell_back = True
        s.metrics.fallbacks.labels(job.rec.endpoint, self.model_label).inc()
        job.changes["service_tier"] = DROP if job.standard_tier == "omit" else job.standard_tier
        self.on_flex = False

    async def _admit(self) -> bool:
        """Leave to try flex now, or after waiting in the gate; False when the request should not try flex."""
        gate, limits = self.job.gate, self.job.limits
        if gate is None:
            return True  # no gate: flex retries wait by the policy's own backoff
        self.flex_pass = gate.try_pass()
        if self.flex_pass is not None:
            return True
        if limits.strategy == "standard":
            return False  # standard does not wait for flex: it goes to the standard tier at once
        if limits.strategy == "fail":
            self.flex_pass = gate.force_pass()  # tries flex once whatever the gate says, and answers what came
            return True
        started = self.s.clock()
        self.flex_pass = await gate.wait(limits.flex_deadline, self.arrived)
        waited = max(0.0, self.flex_pass.waited_s if self.flex_pass is not None else self.s.clock() - started)
        self.s.metrics.gate_wait.labels(gate.key).observe(waited)
        self.job.rec.gate_wait_s += waited
        return self.flex_pass is not None

    def _observe(self, outcome: Outcome, sent_at: float, now: float, retry: float | None) -> None:
        """Tell the gate and the observations what this attempt found."""
        s, job = self.s, self.job
        if self.on_flex:
            busy = outcome is Outcome.FLEX_UNAVAILABLE
            s.observed.flex_attempt(job.family, now, busy)
            if self.flex_pass is not None:
                result = Result.BUSY if busy else Result.OK if outcome is Outcome.OK else Result.ERROR
                self.flex_pass.record(result, now, retry, s.rand(), now - sent_at)
        elif outcome is Outcome.OK:
            s.observed.standard_answer(job.family, now - sent_at, streamed=job.rec.stream)

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
            if response is not None:
                message = f"The upstream API did not finish its answer within {wait:g} s."
            else:
                message = f"The upstream API did not start its answer within {wait:g} s."
            return UpstreamTimeout(message, elapsed_s=elapsed, answered=response is not None)
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


# Failures after which upstream may have accepted, and billed, the work.
_MAYBE_ACCEPTED = frozenset({Outcome.TIMEOUT, Outcome.DEADLINE, Outcome.DROPPED, Outcome.INCOMPLETE})


def _is_sse(response: UpstreamResponse) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def _error_object(data: bytes) -> dict[str, Any] | None:
    obj = json_object(data)
    error = obj.get("error") if obj else None
    return error if isinstance(error, dict) else None
