"""What to do after each upstream attempt: answer, retry on flex, retry the same tier, or fall back.

Pure: the caller passes the clock reading and a random number, so the whole policy is tested as tables.
"""

from __future__ import annotations

import email.utils
import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import STRATEGIES, Settings
from .errors import (
    ClientError,
    DeadlineExceeded,
    UpstreamDropped,
    UpstreamError,
    UpstreamIncomplete,
    UpstreamTimeout,
)
from .policies import Policy

BILLING_CODES = frozenset({
    "insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded", "organization_usage_limit_exceeded", "billing_hard_limit_reached",
})  # fmt: skip
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "slow_down"})
RATE_LIMIT_TYPES = frozenset({"requests", "tokens", "rate_limit_exceeded"})


class Outcome(enum.Enum):
    OK = "ok"
    CLIENT_ERROR = "upstream_error"  # 4xx that no retry can fix: passed through as it came
    BILLING = "quota"
    TOO_LARGE = "too_large"  # a request over the TPM limit never fits, so it is not retried
    TIER_REJECTED = "tier_rejected"
    FLEX_UNAVAILABLE = "flex_unavailable"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"  # a 5xx or 408 that came back as such
    UNREACHABLE = "unreachable"  # no connection: nothing was sent
    DROPPED_EARLY = "dropped_early"  # closed or reset before any answer byte, soon after sending
    DROPPED = "dropped"  # closed or reset before any answer byte, after a silence: upstream may be working
    TIMEOUT = "timeout"  # accepted, and no answer within the tier's time
    DEADLINE = "client_deadline"  # no answer before the client's own deadline
    INCOMPLETE = "stream_cut"  # the answer began, then was cut


# Which outcomes may be re-sent, and why upstream cannot have billed the attempt that produced them
# (OpenAI documents flex 429s as not charged; accepted work is billed even when nobody reads the answer, as
# community reports and gateway billing pages agree: see README, "Never pay twice").
RETRY_REASON = {
    Outcome.FLEX_UNAVAILABLE: "flex_unavailable",  # a 429 is refused work; flex 429s are documented as not charged
    Outcome.RATE_LIMITED: "rate_limited",  # a 429 is refused work
    Outcome.SERVER_ERROR: "server_error",  # the 5xx/408 answer itself says the work was not done
    Outcome.UNREACHABLE: "connection",  # no connection was made: upstream never saw the request
    Outcome.DROPPED_EARLY: "connection",  # refused at once (a stale pooled connection, a reset): not started
    Outcome.TIMEOUT: "timeout",  # NOT safe: re-sent only when the operator opts in (FLEX_PROXY_RETRY_READ_TIMEOUTS)
}
# Never re-sent: DROPPED (a long silence before the drop means upstream may have done the work), DEADLINE,
# INCOMPLETE (the answer had begun: the work was done), and every 4xx that no re-send can fix.


def classify(status: int, error: Mapping[str, Any] | None, *, on_flex: bool) -> Outcome:
    """Sort an upstream answer by what can fix it; `error` is the body's `error` object, if any."""
    if status < 400:
        return Outcome.OK
    code = str((error or {}).get("code") or "")
    type_ = str((error or {}).get("type") or "")
    message = str((error or {}).get("message") or "")
    if status == 429:
        if code in BILLING_CODES or type_ == "insufficient_quota":
            return Outcome.BILLING
        if on_flex and _says_flex_capacity(code, type_, message):
            return Outcome.FLEX_UNAVAILABLE  # an explicit capacity signal wins over a rate-limit code beside it
        if code in RATE_LIMIT_CODES or type_ in RATE_LIMIT_TYPES:
            return Outcome.TOO_LARGE if message.startswith("Request too large") else Outcome.RATE_LIMITED
        # Flex 429 bodies are undocumented: any other 429 on a flex request is taken as flex capacity.
        return Outcome.FLEX_UNAVAILABLE if on_flex else Outcome.RATE_LIMITED
    if status == 400 and (error or {}).get("param") == "service_tier":
        return Outcome.TIER_REJECTED
    if status >= 500 or status == 408:
        return Outcome.SERVER_ERROR
    return Outcome.CLIENT_ERROR


def _says_flex_capacity(code: str, type_: str, message: str) -> bool:
    return "resource_unavailable" in (code, type_) or "resource unavailable" in message.lower()


def classify_stream_error(error: Mapping[str, Any], *, on_flex: bool) -> Outcome:
    """An error that arrives in band, as the first real event of a 200 stream. A status line and headers came
    before it, so upstream may have accepted the work: only an explicit flex-capacity refusal (documented as not
    charged) may be re-sent; anything else is answered as it came."""
    code = str(error.get("code") or "")
    type_ = str(error.get("type") or "")
    if on_flex and _says_flex_capacity(code, type_, str(error.get("message") or "")):
        return Outcome.FLEX_UNAVAILABLE
    if code in BILLING_CODES or type_ == "insufficient_quota":
        return Outcome.BILLING
    return Outcome.CLIENT_ERROR


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait an upstream asked for: `retry-after-ms`, else `retry-after` in seconds or as an HTTP date."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if name == "retry-after-ms":
                continue
            parsed = email.utils.parsedate_tz(value)
            if parsed is None:
                continue
            try:
                seconds = email.utils.mktime_tz(parsed) - (time.time() if now is None else now)
            except (ValueError, OverflowError):  # a date no clock can hold
                continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


@dataclass(slots=True)
class Limits:
    strategy: str  # backoff | standard | backoff-then-standard | fail
    max_flex_attempts: int
    max_retries: int
    backoff_initial_s: float
    backoff_max_s: float
    flex_deadline: float  # clock time after which no new flex attempt starts (nor waiting for one)
    deadline: float  # clock time by which the client's answer must have started
    client_deadline: bool = False  # the deadline is the client's own, not the proxy's budget
    min_backoff_s: float = 0.0
    max_retry_after_s: float = math.inf
    retry_read_timeouts: bool = False
    reset_window_s: float = 0.0
    standard_reserve_s: float = 1.0  # what a standard answer is known to need (the learned reserve)


def parse_strategy(value: str | None, default: str) -> str:
    """The strategy a request asked for with X-Flex-On-Unavailable, else the operator's."""
    if value is None:
        return default
    strategy = value.strip().lower()
    if strategy not in STRATEGIES:
        raise ClientError(
            f"X-Flex-On-Unavailable must be one of {', '.join(STRATEGIES)}.",
            param="X-Flex-On-Unavailable",
            code="invalid_header",
        )
    return strategy


def parse_deadline(value: str | None) -> str | None:
    """X-Flex-Deadline-S: how many seconds the client will wait for its answer to start; checked, kept as text."""
    if value is not None and client_wait_s(value) is None:
        raise ClientError(
            "X-Flex-Deadline-S must be a positive number of seconds.", param="X-Flex-Deadline-S", code="invalid_header"
        )
    return value


def client_wait_s(*values: str | None) -> float | None:
    """The shortest positive, finite number of seconds among the client's deadline headers."""
    found = []
    for value in values:
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds > 0:
            found.append(seconds)
    return min(found, default=None)


def limits_for(
    settings: Settings,
    strategy: str,
    now: float,
    client_wait: float | None,
    standard_reserve_s: float,
    budget: Policy | None = None,
) -> Limits:
    """Limits for one request. Its deadline is the proxy's budget, or the client's own wait (from
    x-stainless-read-timeout or X-Flex-Deadline-S) when that is shorter; `standard_reserve_s` is kept
    free before it for a standard re-send. `budget` is the request's policy (else the settings' own)."""
    budget = budget or Policy.from_settings(settings)
    deadline = now + budget.request_budget_s
    client_deadline = False
    if client_wait is not None and budget.client_deadline:
        # Answer a little before the client gives up, so it gets our final error rather than its own timeout
        # (after which the SDK would re-send, and upstream might do the work twice).
        mine = now + client_wait - min(1.0, client_wait * 0.05)
        if mine <= deadline:
            deadline, client_deadline = mine, True
    flex_deadline = min(now + budget.flex_budget_s, deadline)
    if strategy == "backoff-then-standard":
        flex_deadline = min(flex_deadline, deadline - standard_reserve_s)
    return Limits(
        strategy=strategy,
        max_flex_attempts=budget.max_flex_attempts,
        max_retries=settings.max_retries,
        backoff_initial_s=settings.backoff_initial_s,
        backoff_max_s=settings.backoff_max_s,
        flex_deadline=flex_deadline,
        deadline=deadline,
        client_deadline=client_deadline,
        min_backoff_s=settings.min_backoff_s,
        max_retry_after_s=settings.max_retry_after_s,
        retry_read_timeouts=settings.retry_read_timeouts,
        reset_window_s=settings.reset_retry_window_s,
        standard_reserve_s=standard_reserve_s,
    )


def classify_failure(exc: UpstreamError, limits: Limits) -> Outcome:
    """Sort an attempt that got no answer by what upstream may have done with the request."""
    if isinstance(exc, UpstreamDropped):
        return Outcome.DROPPED_EARLY if exc.elapsed_s <= limits.reset_window_s else Outcome.DROPPED
    if isinstance(exc, DeadlineExceeded):
        return Outcome.DEADLINE
    if isinstance(exc, UpstreamTimeout):
        # Silent after its status line: never re-sent, even where read timeouts are (the work may be accepted).
        return Outcome.INCOMPLETE if exc.answered else Outcome.TIMEOUT
    if isinstance(exc, UpstreamIncomplete):
        return Outcome.INCOMPLETE
    return Outcome.UNREACHABLE


@dataclass
class Progress:
    """How far the request got: counts that the policy reads and the pipeline updates."""

    flex_attempts: int = 0
    retries: int = 0  # retries for rate limits, server errors, timeouts and connection errors
    tier_rejected: bool = False


class Step(enum.Enum):
    ANSWER = "answer"  # give the client what we have
    RETRY = "retry"  # same tier, after `delay`
    FALLBACK = "fallback"  # re-send on the standard tier, after `delay`
    DROP_TIER = "drop_tier"  # re-send without service_tier (upstream rejected it)
    WAIT = "wait"  # wait in the flex gate for flex, until the flex deadline


@dataclass(frozen=True)
class Action:
    step: Step
    delay: float = 0.0
    reason: str | None = None


ANSWER = Action(Step.ANSWER)
WAITING_STRATEGIES = frozenset({"backoff", "backoff-then-standard"})  # those that wait for flex
MIN_ATTEMPT_S = 1.0  # a retry that leaves less time than this before the deadline is not worth starting


def backoff_delay(limits: Limits, n: int, rand: float, floor: float | None) -> float:
    """Full-jitter exponential backoff for the n-th retry (n from 0), never below the upstream's wait nor the
    minimum gap (full jitter alone can draw zero, and three attempts in a blink help nobody)."""
    cap = min(limits.backoff_max_s, limits.backoff_initial_s * 2.0 ** min(max(n, 0), 32))
    return max(rand * cap, limits.min_backoff_s, floor or 0.0)


def wait_too_long(limits: Limits, now: float, retry_after: float | None, deadline: float) -> bool:
    """Whether upstream asks for a longer wait than the proxy sleeps through, or than the time left."""
    return retry_after is not None and (retry_after > limits.max_retry_after_s or now + retry_after > deadline)


def suggested_wait_s(limits: Limits) -> int:
    """Whole seconds for the `retry-after` of a 429 the proxy gives up on, when upstream sent none."""
    return max(1, math.ceil(min(limits.backoff_max_s, limits.backoff_initial_s * 2)))


def next_action(
    outcome: Outcome,
    *,
    on_flex: bool,
    managed: bool,
    progress: Progress,
    limits: Limits,
    now: float,
    retry_after: float | None,
    rand: float,
) -> Action:
    """The policy in one place; see the README's "When flex is unavailable" for the prose version."""
    if outcome is Outcome.TIER_REJECTED:
        if managed and on_flex and not progress.tier_rejected:
            return Action(Step.DROP_TIER, reason="tier_rejected")
        return ANSWER
    if outcome is Outcome.FLEX_UNAVAILABLE and on_flex:
        return _flex_unavailable(progress, limits, now, retry_after, rand)
    reason = RETRY_REASON.get(outcome)
    if reason is None or progress.retries >= limits.max_retries:
        return ANSWER
    if outcome is Outcome.TIMEOUT and not limits.retry_read_timeouts:
        return ANSWER
    if wait_too_long(limits, now, retry_after, limits.deadline - MIN_ATTEMPT_S):
        return ANSWER  # the client gets the 429 and its retry-after now, rather than a proxy asleep
    delay = backoff_delay(limits, progress.retries, rand, retry_after)
    if now + delay + MIN_ATTEMPT_S > limits.deadline:
        return ANSWER
    return Action(Step.RETRY, delay, reason)


def _flex_unavailable(
    progress: Progress, limits: Limits, now: float, retry_after: float | None, rand: float
) -> Action:
    strategy = limits.strategy
    if strategy == "fail":
        return ANSWER
    if (
        strategy in ("backoff", "backoff-then-standard")
        and progress.flex_attempts < limits.max_flex_attempts
        and not wait_too_long(limits, now, retry_after, limits.flex_deadline)
    ):
        delay = backoff_delay(limits, progress.flex_attempts - 1, rand, retry_after)
        if now + delay <= limits.flex_deadline and now + delay + MIN_ATTEMPT_S <= limits.deadline:
            return Action(Step.RETRY, delay, "flex_unavailable")
    if strategy in ("standard", "backoff-then-standard") and _time_for_standard(limits, now):
        return Action(Step.FALLBACK, 0.0, "flex_unavailable")
    return ANSWER


def _time_for_standard(limits: Limits, now: float) -> bool:
    """Whether a standard re-send can still answer before the deadline: it needs MIN_ATTEMPT_S, or less where
    standard is known to answer faster. (Half the reserve: the flex deadline leaves exactly the reserve, and the
    timer that ends a wait for flex fires a little after it.)"""
    return now + min(MIN_ATTEMPT_S, limits.standard_reserve_s / 2) <= limits.deadline


def after_gate_refusal(limits: Limits, now: float, retry_after: float | None) -> Action:
    """With the flex gate: after a flex-capacity 429, wait in the gate until the flex deadline, then take the
    strategy's next step. No random draw and no attempt count decide it: the gate's pace bounds the load, and a
    flex 429 is not billed. A retry-after longer than the proxy sleeps through, or than the time left for flex,
    ends the wait at once."""
    if (
        limits.strategy in WAITING_STRATEGIES
        and now < limits.flex_deadline
        and not wait_too_long(limits, now, retry_after, limits.flex_deadline)
    ):
        return Action(Step.WAIT, 0.0, "flex_unavailable")
    return after_flex_wait(limits, now)


def no_room_for_flex(limits: Limits, now: float) -> bool:
    """Whether the request's deadline is closer than the time a standard answer needs (the learned reserve):
    then a flex 429 could not be followed by a fallback in time, so the request goes to the standard tier at
    once rather than risk a 429 or a 504 on work upstream accepted."""
    return limits.strategy == "backoff-then-standard" and limits.deadline - limits.standard_reserve_s <= now


def after_flex_wait(limits: Limits, now: float) -> Action:
    """Flex did not open up in time for this request (or the strategy does not wait for it): the next step."""
    if limits.strategy in ("standard", "backoff-then-standard") and _time_for_standard(limits, now):
        return Action(Step.FALLBACK, 0.0, "flex_unavailable")
    return ANSWER
