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
from .errors import ClientError

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
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION = "unreachable"


RETRY_REASON = {
    Outcome.FLEX_UNAVAILABLE: "flex_unavailable",
    Outcome.RATE_LIMITED: "rate_limited",
    Outcome.SERVER_ERROR: "server_error",
    Outcome.TIMEOUT: "timeout",
    Outcome.CONNECTION: "connection",
}


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
    if status == 408:
        return Outcome.TIMEOUT
    if status >= 500:
        return Outcome.SERVER_ERROR
    return Outcome.CLIENT_ERROR


def _says_flex_capacity(code: str, type_: str, message: str) -> bool:
    return "resource_unavailable" in (code, type_) or "resource unavailable" in message.lower()


def classify_stream_error(error: Mapping[str, Any], *, on_flex: bool) -> Outcome:
    """An error that arrives as the first event of a 200 stream, sorted as if it had its own status."""
    code = str(error.get("code") or "")
    type_ = str(error.get("type") or "")
    looks_like_429 = code in RATE_LIMIT_CODES | BILLING_CODES or type_ == "insufficient_quota"
    if looks_like_429 or _says_flex_capacity(code, type_, str(error.get("message") or "")):
        return classify(429, error, on_flex=on_flex)
    if code in ("server_is_overloaded", "server_error") or type_ in ("server_error", "service_unavailable_error"):
        return Outcome.SERVER_ERROR
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


@dataclass(frozen=True)
class Limits:
    strategy: str  # backoff | standard | backoff-then-standard | fail
    max_flex_attempts: int
    max_retries: int
    backoff_initial_s: float
    backoff_max_s: float
    flex_deadline: float  # clock time after which no new flex attempt starts
    deadline: float  # clock time by which the client must have its answer


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


def limits_for(settings: Settings, strategy: str, now: float, client_timeout: str | None) -> Limits:
    """Retry limits for one request; the client's read timeout (x-stainless-read-timeout) is the hard deadline."""
    deadline = math.inf
    if client_timeout is not None:
        try:
            seconds = float(client_timeout)
        except ValueError:
            seconds = math.nan
        if math.isfinite(seconds) and seconds > 0:
            # Answer a little before the client gives up, so it gets our error rather than its own timeout.
            deadline = now + seconds - min(1.0, seconds * 0.05)
    flex_deadline = min(now + settings.flex_budget_s, deadline)
    if strategy == "backoff-then-standard":
        flex_deadline = min(flex_deadline, deadline - settings.standard_reserve_s)
    return Limits(
        strategy=strategy,
        max_flex_attempts=settings.max_flex_attempts,
        max_retries=settings.max_retries,
        backoff_initial_s=settings.backoff_initial_s,
        backoff_max_s=settings.backoff_max_s,
        flex_deadline=flex_deadline,
        deadline=deadline,
    )


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


@dataclass(frozen=True)
class Action:
    step: Step
    delay: float = 0.0
    reason: str | None = None


ANSWER = Action(Step.ANSWER)
MIN_ATTEMPT_S = 1.0  # a retry that leaves less time than this before the deadline is not worth starting


def backoff_delay(limits: Limits, n: int, rand: float, floor: float | None) -> float:
    """Full-jitter exponential backoff for the n-th retry (n from 0), never below the upstream's wait."""
    cap = min(limits.backoff_max_s, limits.backoff_initial_s * 2.0**n)
    delay = rand * cap
    return max(delay, floor) if floor is not None else delay


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
    if strategy in ("backoff", "backoff-then-standard") and progress.flex_attempts < limits.max_flex_attempts:
        delay = backoff_delay(limits, progress.flex_attempts - 1, rand, retry_after)
        if now + delay <= limits.flex_deadline and now + delay + MIN_ATTEMPT_S <= limits.deadline:
            return Action(Step.RETRY, delay, "flex_unavailable")
    if strategy in ("standard", "backoff-then-standard") and now + MIN_ATTEMPT_S <= limits.deadline:
        return Action(Step.FALLBACK, 0.0, "flex_unavailable")
    return ANSWER
