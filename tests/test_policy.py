"""proxy.policy: how upstream answers are sorted and what the proxy does next, as tables."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.config import Settings
from proxy.errors import (
    ClientError,
    DeadlineExceeded,
    UpstreamDropped,
    UpstreamError,
    UpstreamIncomplete,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.policy import (
    ANSWER,
    MIN_ATTEMPT_S,
    Action,
    Limits,
    Outcome,
    Progress,
    Step,
    after_flex_wait,
    after_gate_refusal,
    backoff_delay,
    classify,
    classify_failure,
    classify_stream_error,
    client_wait_s,
    limits_for,
    next_action,
    no_room_for_flex,
    parse_deadline,
    retry_after_s,
)

TOO_LARGE_MESSAGE = (
    "Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 36278. "
    "The input or output tokens must be reduced in order to run successfully."
)
QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."
TPM_MESSAGE = (
    "Rate limit reached for o3 in organization org-x on tokens per min (TPM): Limit 10000, Used 9348, "
    "Requested 5086. Please try again in 26.604s."
)


@pytest.mark.parametrize(
    ("status", "error", "on_flex", "outcome"),
    [
        pytest.param(
            429, {"message": "Resource Unavailable", "type": "rate_limit_error", "code": "resource_unavailable"},
            True, Outcome.FLEX_UNAVAILABLE, id="resource_unavailable-flex",
        ),
        pytest.param(
            429, {"message": "Resource Unavailable", "type": "rate_limit_error", "code": "resource_unavailable"},
            False, Outcome.RATE_LIMITED, id="resource_unavailable-not-flex",
        ),
        pytest.param(429, {"message": "Resource Unavailable"}, True, Outcome.FLEX_UNAVAILABLE, id="message-only-flex"),
        pytest.param(429, {"code": "flex_unavailable"}, True, Outcome.FLEX_UNAVAILABLE, id="unknown-code-flex"),
        pytest.param(429, {"code": "flex_unavailable"}, False, Outcome.RATE_LIMITED, id="unknown-code-not-flex"),
        pytest.param(429, None, True, Outcome.FLEX_UNAVAILABLE, id="no-body-flex"),
        pytest.param(429, None, False, Outcome.RATE_LIMITED, id="no-body-not-flex"),
        pytest.param(
            429, {"message": TPM_MESSAGE, "type": "tokens", "code": "rate_limit_exceeded"},
            True, Outcome.RATE_LIMITED, id="rate_limit_exceeded-flex",
        ),
        pytest.param(
            429, {"message": TPM_MESSAGE, "type": "requests", "code": "rate_limit_exceeded"},
            False, Outcome.RATE_LIMITED, id="rate_limit_exceeded-not-flex",
        ),
        pytest.param(429, {"type": "tokens", "code": None}, True, Outcome.RATE_LIMITED, id="type-tokens"),
        pytest.param(429, {"type": "requests"}, True, Outcome.RATE_LIMITED, id="type-requests"),
        pytest.param(
            429, {"type": "rate_limit_error", "code": "slow_down"}, True, Outcome.RATE_LIMITED, id="slow_down"
        ),
        pytest.param(
            429, {"message": TOO_LARGE_MESSAGE, "type": "tokens", "code": "rate_limit_exceeded"},
            True, Outcome.TOO_LARGE, id="request-too-large-flex",
        ),
        pytest.param(
            429, {"message": TOO_LARGE_MESSAGE, "type": "tokens", "code": "rate_limit_exceeded"},
            False, Outcome.TOO_LARGE, id="request-too-large-not-flex",
        ),
        pytest.param(
            429, {"message": "Resource Unavailable", "type": "requests", "code": "rate_limit_exceeded"},
            True, Outcome.FLEX_UNAVAILABLE, id="capacity-message-beats-rate-limit-code-on-flex",
        ),
        pytest.param(
            429, {"message": "Resource Unavailable", "type": "requests", "code": "rate_limit_exceeded"},
            False, Outcome.RATE_LIMITED, id="capacity-message-off-flex-is-a-rate-limit",
        ),
        pytest.param(
            429, {"message": "Resource unavailable. Try later.", "type": "insufficient_quota", "code": None},
            True, Outcome.BILLING, id="billing-beats-capacity-message",
        ),
        pytest.param(
            429, {"message": QUOTA_MESSAGE, "type": "insufficient_quota", "code": "insufficient_quota"},
            True, Outcome.BILLING, id="insufficient_quota-code",
        ),
        pytest.param(
            429, {"message": QUOTA_MESSAGE, "type": "insufficient_quota", "code": None},
            True, Outcome.BILLING, id="insufficient_quota-type-only",
        ),
        pytest.param(
            429, {"type": "insufficient_quota", "code": "rate_limit_exceeded"},
            False, Outcome.BILLING, id="billing-type-beats-rate-limit-code",
        ),
        pytest.param(
            429, {"type": "insufficient_quota", "code": "credit_balance_exhausted"},
            True, Outcome.BILLING, id="credit_balance_exhausted",
        ),
        pytest.param(
            429, {"code": "organization_spend_limit_exceeded"}, True, Outcome.BILLING,
            id="organization_spend_limit_exceeded",
        ),
        pytest.param(
            429, {"code": "project_spend_limit_exceeded"}, False, Outcome.BILLING, id="project_spend_limit_exceeded"
        ),
        pytest.param(
            429, {"code": "organization_usage_limit_exceeded"}, True, Outcome.BILLING,
            id="organization_usage_limit_exceeded",
        ),
        pytest.param(429, {"code": "billing_hard_limit_reached"}, True, Outcome.BILLING, id="billing_hard_limit"),
        pytest.param(
            400, {"message": "Invalid service_tier argument", "type": "invalid_request_error", "param": "service_tier"},
            True, Outcome.TIER_REJECTED, id="400-service_tier-flex",
        ),
        pytest.param(
            400, {"param": "service_tier"}, False, Outcome.TIER_REJECTED, id="400-service_tier-not-flex"
        ),
        pytest.param(400, {"param": "model"}, True, Outcome.CLIENT_ERROR, id="400-other-param"),
        pytest.param(400, None, True, Outcome.CLIENT_ERROR, id="400-no-body"),
        pytest.param(401, {"code": "invalid_api_key"}, True, Outcome.CLIENT_ERROR, id="401"),
        pytest.param(403, None, True, Outcome.CLIENT_ERROR, id="403"),
        pytest.param(404, {"code": "model_not_found"}, True, Outcome.CLIENT_ERROR, id="404"),
        pytest.param(413, None, False, Outcome.CLIENT_ERROR, id="413"),
        pytest.param(422, None, False, Outcome.CLIENT_ERROR, id="422"),
        pytest.param(408, None, True, Outcome.SERVER_ERROR, id="408-answered-as-such"),
        pytest.param(500, {"type": "server_error"}, True, Outcome.SERVER_ERROR, id="500"),
        pytest.param(502, None, False, Outcome.SERVER_ERROR, id="502"),
        pytest.param(
            503, {"type": "service_unavailable_error", "code": "server_is_overloaded"},
            True, Outcome.SERVER_ERROR, id="503",
        ),
        pytest.param(504, None, True, Outcome.SERVER_ERROR, id="504"),
        pytest.param(200, None, True, Outcome.OK, id="200"),
        pytest.param(201, None, False, Outcome.OK, id="201"),
        pytest.param(304, None, False, Outcome.OK, id="304"),
    ],
)  # fmt: skip
def test_classify(status: int, error: Mapping[str, Any] | None, on_flex: bool, outcome: Outcome) -> None:
    assert classify(status, error, on_flex=on_flex) is outcome


@pytest.mark.parametrize(
    ("error", "on_flex", "outcome"),
    [
        # In band, after a status line: upstream may have accepted the work, so only a flex-capacity refusal (not
        # charged) is re-sent; server errors and rate limits are answered as they came.
        ({"type": "service_unavailable_error", "code": "server_is_overloaded"}, True, Outcome.CLIENT_ERROR),
        ({"type": "server_error", "code": None}, True, Outcome.CLIENT_ERROR),
        ({"code": "server_error"}, False, Outcome.CLIENT_ERROR),
        ({"code": "resource_unavailable", "message": "Resource Unavailable"}, True, Outcome.FLEX_UNAVAILABLE),
        ({"code": "resource_unavailable"}, False, Outcome.CLIENT_ERROR),  # not sent on flex: nothing to fix
        ({"type": "resource_unavailable"}, True, Outcome.FLEX_UNAVAILABLE),
        ({"code": "rate_limit_exceeded", "message": TPM_MESSAGE}, True, Outcome.CLIENT_ERROR),
        ({"code": "rate_limit_exceeded", "message": TOO_LARGE_MESSAGE}, True, Outcome.CLIENT_ERROR),
        ({"type": "rate_limit_error", "code": "slow_down"}, True, Outcome.CLIENT_ERROR),
        ({"type": "insufficient_quota", "code": "insufficient_quota"}, True, Outcome.BILLING),
        ({"code": "project_spend_limit_exceeded"}, False, Outcome.BILLING),
        ({"type": "invalid_request_error", "code": "invalid_prompt"}, True, Outcome.CLIENT_ERROR),
        ({}, True, Outcome.CLIENT_ERROR),
        pytest.param(
            {"type": "insufficient_quota", "code": None},
            True,
            Outcome.BILLING,
            id="insufficient_quota-type-only",
        ),
    ],
)
def test_classify_stream_error(error: Mapping[str, Any], on_flex: bool, outcome: Outcome) -> None:
    assert classify_stream_error(error, on_flex=on_flex) is outcome


NOW = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "0.5"}, 0.0005),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": " 5 "}, 5.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after-ms": "250", "retry-after": "10"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"retry-after-ms": "inf", "retry-after": "3"}, 3.0),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "1e400"}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
        ({"retry-after": "Wed, 21 Oct 2015 08:28:30 +0100"}, 30.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "Mon, 99 Foo 2020"}, None),
        ({"x-ratelimit-reset-requests": "1s"}, None),
        ({}, None),
        pytest.param(
            {"retry-after": "Wed, 21 Oct 99999 07:28:00 GMT"},
            None,
            id="date-out-of-range",
        ),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after_s(headers, now=NOW) == seconds


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        (CIMultiDict({"Retry-After": "4"}), 4.0),
        (CIMultiDict({"Retry-After-Ms": "40", "Retry-After": "4"}), 0.04),
    ],
)
def test_retry_after_header_names_are_case_insensitive_in_real_headers(
    headers: CIMultiDict[str], seconds: float
) -> None:
    assert retry_after_s(headers) == seconds


def test_retry_after_date_defaults_to_the_wall_clock() -> None:
    date = "Fri, 01 Jan 2100 00:00:00 GMT"
    expected = email.utils.mktime_tz(email.utils.parsedate_tz(date)) - time.time()  # type: ignore[arg-type]
    assert retry_after_s({"retry-after": date}) == pytest.approx(expected, abs=60)


LIMITS = Limits(
    strategy="backoff-then-standard",
    max_flex_attempts=4,
    max_retries=2,
    backoff_initial_s=1.0,
    backoff_max_s=30.0,
    flex_deadline=120.0,
    deadline=900.0,
    standard_reserve_s=2.0,  # the learned reserve's floor by default
)


@pytest.mark.parametrize(
    ("initial", "cap", "n", "rand", "floor", "delay"),
    [
        (1.0, 30.0, 0, 0.0, None, 0.0),
        (1.0, 30.0, 0, 1.0, None, 1.0),
        (1.0, 30.0, 0, 0.5, None, 0.5),
        (1.0, 30.0, 1, 1.0, None, 2.0),
        (1.0, 30.0, 3, 1.0, None, 8.0),
        (1.0, 30.0, 3, 0.0, None, 0.0),
        (1.0, 30.0, 4, 1.0, None, 16.0),
        (1.0, 30.0, 5, 1.0, None, 30.0),
        (1.0, 30.0, 10, 1.0, None, 30.0),
        (1.0, 30.0, 10, 0.5, None, 15.0),
        (0.5, 8.0, 4, 1.0, None, 8.0),
        (1.0, 30.0, 1_025, 1.0, None, 30.0),  # 2.0 ** 1_024 overflows: the exponent is clamped first
        (0.5, 8.0, 2, 0.25, None, 0.5),
        (1.0, 30.0, 0, 1.0, 5.0, 5.0),
        (1.0, 30.0, 0, 0.0, 5.0, 5.0),
        (1.0, 30.0, 5, 1.0, 0.2, 30.0),
        (1.0, 30.0, 0, 0.0, 0.0, 0.0),
        (1.0, 30.0, 0, 0.0, 120.0, 120.0),
    ],
)
def test_backoff_delay(initial: float, cap: float, n: int, rand: float, floor: float | None, delay: float) -> None:
    limits = replace(LIMITS, backoff_initial_s=initial, backoff_max_s=cap)
    assert backoff_delay(limits, n, rand, floor) == delay


def _action(
    outcome: Outcome,
    *,
    strategy: str = "backoff-then-standard",
    on_flex: bool = True,
    managed: bool = True,
    flex_attempts: int = 1,
    retries: int = 0,
    tier_rejected: bool = False,
    max_retries: int = 2,
    flex_deadline: float = 120.0,
    deadline: float = 900.0,
    now: float = 0.0,
    retry_after: float | None = None,
    rand: float = 1.0,
    **more: Any,
) -> Action:
    limits = replace(
        LIMITS, strategy=strategy, max_retries=max_retries, flex_deadline=flex_deadline, deadline=deadline, **more
    )
    progress = Progress(flex_attempts=flex_attempts, retries=retries, tier_rejected=tier_rejected)
    return next_action(
        outcome,
        on_flex=on_flex,
        managed=managed,
        progress=progress,
        limits=limits,
        now=now,
        retry_after=retry_after,
        rand=rand,
    )


FU = Outcome.FLEX_UNAVAILABLE
FLEX_RETRY = "flex_unavailable"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({}, Action(Step.RETRY, 1.0, FLEX_RETRY), id="bts-first-retry"),
        pytest.param({"flex_attempts": 3}, Action(Step.RETRY, 4.0, FLEX_RETRY), id="bts-third-retry"),
        pytest.param({"flex_attempts": 3, "rand": 0.25}, Action(Step.RETRY, 1.0, FLEX_RETRY), id="bts-jitter"),
        pytest.param({"flex_attempts": 4}, Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="bts-attempts-used-up"),
        pytest.param({"flex_attempts": 9}, Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="bts-past-limit"),
        pytest.param({"strategy": "backoff"}, Action(Step.RETRY, 1.0, FLEX_RETRY), id="backoff-first-retry"),
        pytest.param(
            {"strategy": "backoff", "flex_attempts": 2, "rand": 0.5}, Action(Step.RETRY, 1.0, FLEX_RETRY),
            id="backoff-second-retry",
        ),
        pytest.param({"strategy": "backoff", "flex_attempts": 4}, ANSWER, id="backoff-attempts-used-up"),
        pytest.param({"strategy": "standard"}, Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="standard"),
        pytest.param(
            {"strategy": "standard", "flex_attempts": 4}, Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="standard-late"
        ),
        pytest.param({"strategy": "fail"}, ANSWER, id="fail"),
        pytest.param({"strategy": "fail", "flex_attempts": 4}, ANSWER, id="fail-late"),
        pytest.param({"now": 121.0}, Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="bts-flex-deadline-passed"),
        pytest.param({"strategy": "backoff", "now": 121.0}, ANSWER, id="backoff-flex-deadline-passed"),
        pytest.param({"now": 119.0}, Action(Step.RETRY, 1.0, FLEX_RETRY), id="retry-lands-on-flex-deadline"),
        pytest.param({"now": 119.5}, Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="retry-lands-past-flex-deadline"),
        pytest.param({"deadline": 1.5}, Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="bts-no-time-for-retry"),
        pytest.param({"deadline": 2.0}, Action(Step.RETRY, 1.0, FLEX_RETRY), id="bts-just-time-for-retry"),
        pytest.param({"deadline": MIN_ATTEMPT_S}, Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="bts-just-time-fallback"),
        pytest.param({"deadline": 0.5}, ANSWER, id="bts-client-deadline-too-close"),
        pytest.param({"strategy": "standard", "deadline": 0.5}, ANSWER, id="standard-client-deadline-too-close"),
        pytest.param({"strategy": "backoff", "deadline": 1.5}, ANSWER, id="backoff-client-deadline-too-close"),
        pytest.param({"retry_after": 7.0, "rand": 0.0}, Action(Step.RETRY, 7.0, FLEX_RETRY), id="retry-after-floor"),
        pytest.param({"retry_after": 0.0}, Action(Step.RETRY, 1.0, FLEX_RETRY), id="retry-after-zero"),
        pytest.param(
            {"retry_after": 200.0}, Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="bts-retry-after-past-flex-deadline"
        ),
        pytest.param(
            {"strategy": "backoff", "retry_after": 200.0}, ANSWER, id="backoff-retry-after-past-flex-deadline"
        ),
        pytest.param(
            {"retry_after": 100.0, "flex_deadline": 500.0, "deadline": 100.5},
            Action(Step.FALLBACK, 0.0, FLEX_RETRY), id="bts-retry-after-past-client-deadline",
        ),
        pytest.param({"managed": False, "strategy": "backoff"}, Action(Step.RETRY, 1.0, FLEX_RETRY), id="unmanaged"),
    ],
)  # fmt: skip
def test_next_action_flex_unavailable(kwargs: dict[str, Any], expected: Action) -> None:
    assert _action(FU, **kwargs) == expected


RETRYABLE = [
    (Outcome.RATE_LIMITED, "rate_limited"),
    (Outcome.SERVER_ERROR, "server_error"),
    (Outcome.UNREACHABLE, "connection"),
    (Outcome.DROPPED_EARLY, "connection"),
]


@pytest.mark.parametrize(("outcome", "reason"), RETRYABLE)
@pytest.mark.parametrize(
    ("kwargs", "step", "delay"),
    [
        pytest.param({}, Step.RETRY, 1.0, id="first"),
        pytest.param({"on_flex": False}, Step.RETRY, 1.0, id="first-not-flex"),
        pytest.param({"retries": 1}, Step.RETRY, 2.0, id="second"),
        pytest.param({"retries": 1, "rand": 0.0}, Step.RETRY, 0.0, id="second-no-jitter"),
        pytest.param({"retries": 2}, Step.ANSWER, 0.0, id="max-retries-reached"),
        pytest.param({"max_retries": 0}, Step.ANSWER, 0.0, id="no-retries-allowed"),
        pytest.param({"retry_after": 5.0}, Step.RETRY, 5.0, id="retry-after-floor"),
        pytest.param({"retry_after": 20.0, "deadline": 10.0}, Step.ANSWER, 0.0, id="retry-after-past-deadline"),
        pytest.param({"deadline": 2.0}, Step.RETRY, 1.0, id="just-time"),
        pytest.param({"deadline": 1.9}, Step.ANSWER, 0.0, id="deadline-too-close"),
        pytest.param({"now": 899.0, "rand": 0.0}, Step.RETRY, 0.0, id="now-leaves-exactly-one-attempt"),
        pytest.param({"now": 899.5, "rand": 0.0}, Step.ANSWER, 0.0, id="now-too-near-deadline"),
        pytest.param({"strategy": "fail"}, Step.RETRY, 1.0, id="strategy-is-only-for-flex"),
    ],
)
def test_next_action_retryable(outcome: Outcome, reason: str, kwargs: dict[str, Any], step: Step, delay: float) -> None:
    expected = ANSWER if step is Step.ANSWER else Action(step, delay, reason)
    assert _action(outcome, **kwargs) == expected


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome.OK, Outcome.CLIENT_ERROR, Outcome.BILLING, Outcome.TOO_LARGE,
        # Upstream may have done (and billed) the work: re-sending could pay twice.
        Outcome.TIMEOUT, Outcome.DROPPED, Outcome.DEADLINE, Outcome.INCOMPLETE,
    ],
)  # fmt: skip
@pytest.mark.parametrize("on_flex", [True, False])
def test_next_action_final_outcomes(outcome: Outcome, on_flex: bool) -> None:
    assert _action(outcome, on_flex=on_flex, retry_after=1.0) == ANSWER


def test_read_timeouts_are_re_sent_only_when_the_operator_opts_in() -> None:
    assert _action(Outcome.TIMEOUT) == ANSWER
    assert _action(Outcome.TIMEOUT, retry_read_timeouts=True) == Action(Step.RETRY, 1.0, "timeout")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"retry_after": 61.0, "max_retry_after_s": 60.0}, ANSWER, id="rate-limit-wait-above-cap"),
        pytest.param({"retry_after": 60.0, "max_retry_after_s": 60.0}, Action(Step.RETRY, 60.0, "rate_limited"),
                     id="rate-limit-wait-at-cap"),
        pytest.param({"retry_after": 30.0, "deadline": 30.5}, ANSWER, id="rate-limit-wait-past-time-left"),
        pytest.param({"rand": 0.0, "min_backoff_s": 0.25}, Action(Step.RETRY, 0.25, "rate_limited"), id="min-gap"),
    ],
)  # fmt: skip
def test_rate_limit_waits_are_capped(kwargs: dict[str, Any], expected: Action) -> None:
    assert _action(Outcome.RATE_LIMITED, **kwargs) == expected


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("backoff-then-standard", Action(Step.FALLBACK, 0.0, FLEX_RETRY)),
        ("backoff", ANSWER),
    ],
)
def test_flex_retry_after_above_the_cap_is_not_slept_through(strategy: str, expected: Action) -> None:
    assert _action(FU, strategy=strategy, retry_after=90.0, max_retry_after_s=60.0, flex_deadline=500.0) == expected


def test_flex_retries_keep_a_minimum_gap() -> None:
    assert _action(FU, rand=0.0, min_backoff_s=0.25) == Action(Step.RETRY, 0.25, FLEX_RETRY)


@pytest.mark.parametrize(
    ("error", "elapsed", "outcome"),
    [
        (UpstreamUnreachable("x"), 0.0, Outcome.UNREACHABLE),
        (UpstreamDropped("x"), 0.5, Outcome.DROPPED_EARLY),
        (UpstreamDropped("x"), 2.0, Outcome.DROPPED_EARLY),
        (UpstreamDropped("x"), 2.5, Outcome.DROPPED),
        (UpstreamTimeout("x"), 900.0, Outcome.TIMEOUT),
        (DeadlineExceeded("x"), 59.0, Outcome.DEADLINE),
        (UpstreamIncomplete("x"), 0.1, Outcome.INCOMPLETE),
    ],
)
def test_classify_failure(error: UpstreamError, elapsed: float, outcome: Outcome) -> None:
    error.elapsed_s = elapsed
    assert classify_failure(error, replace(LIMITS, reset_window_s=2.0)) == outcome


SETTINGS = Settings(request_budget_s=900, flex_budget_s=120)


@pytest.mark.parametrize(
    ("strategy", "client_wait", "reserve", "deadline", "flex_deadline", "client_deadline"),
    [
        ("backoff-then-standard", None, 15.0, 900.0, 120.0, False),  # no deadline stated: the proxy's budget
        ("backoff-then-standard", 600.0, 15.0, 599.0, 120.0, True),  # the SDK's 600 s, answered a second early
        ("backoff-then-standard", 60.0, 2.0, 59.0, 57.0, True),  # a short deadline leaves most of it for flex
        ("backoff", 60.0, 2.0, 59.0, 59.0, True),  # no standard re-send: nothing reserved
        ("backoff-then-standard", 10.0, 2.0, 9.5, 7.5, True),
        ("backoff-then-standard", 5000.0, 2.0, 900.0, 120.0, False),  # the budget is shorter than the client
    ],
)
def test_limits_for(
    strategy: str, client_wait: float | None, reserve: float, deadline: float, flex_deadline: float, client_deadline: bool,  # noqa: E501
) -> None:
    limits = limits_for(SETTINGS, strategy, 0.0, client_wait, reserve)
    assert (limits.deadline, limits.flex_deadline, limits.client_deadline) == (deadline, flex_deadline, client_deadline)


@pytest.mark.parametrize(
    ("values", "seconds"),
    [(("600",), 600.0), (("600", "30"), 30.0), ((None, "45.5"), 45.5), (("nan", "x", "-1", "inf"), None), ((), None)],
)
def test_client_wait_is_the_shortest_stated(values: tuple[str | None, ...], seconds: float | None) -> None:
    assert client_wait_s(*values) == seconds


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_a_bad_deadline_header_is_a_client_error(value: str) -> None:
    with pytest.raises(ClientError, match="X-Flex-Deadline-S"):
        parse_deadline(value)


@pytest.mark.parametrize(
    ("strategy", "now", "expected"),
    [
        ("backoff-then-standard", 10.0, Action(Step.FALLBACK, 0.0, FLEX_RETRY)),
        ("standard", 10.0, Action(Step.FALLBACK, 0.0, FLEX_RETRY)),
        ("backoff", 10.0, ANSWER),
        ("backoff-then-standard", 899.5, ANSWER),  # no time left for the standard re-send
    ],
)
def test_after_flex_wait(strategy: str, now: float, expected: Action) -> None:
    assert after_flex_wait(replace(LIMITS, strategy=strategy), now) == expected


@pytest.mark.parametrize(
    ("strategy", "now", "retry_after", "expected"),
    [
        # The gate path waits until the flex deadline (120 s here), whatever a draw or an attempt count says.
        ("backoff-then-standard", 0.0, None, Action(Step.WAIT, 0.0, FLEX_RETRY)),
        ("backoff-then-standard", 119.9, None, Action(Step.WAIT, 0.0, FLEX_RETRY)),
        ("backoff", 119.9, None, Action(Step.WAIT, 0.0, FLEX_RETRY)),
        ("backoff-then-standard", 5.0, 30.0, Action(Step.WAIT, 0.0, FLEX_RETRY)),  # fits before the flex deadline
        # ... then the strategy's next step.
        ("backoff-then-standard", 120.0, None, Action(Step.FALLBACK, 0.0, FLEX_RETRY)),
        ("backoff", 120.0, None, ANSWER),
        ("backoff-then-standard", 100.0, 30.0, Action(Step.FALLBACK, 0.0, FLEX_RETRY)),  # past the flex deadline
        ("backoff-then-standard", 0.0, 61.0, Action(Step.FALLBACK, 0.0, FLEX_RETRY)),  # longer than the proxy sleeps
        ("backoff", 0.0, 61.0, ANSWER),
        ("standard", 0.0, None, Action(Step.FALLBACK, 0.0, FLEX_RETRY)),  # never waits
        ("fail", 0.0, None, ANSWER),
    ],
)
def test_after_gate_refusal(strategy: str, now: float, retry_after: float | None, expected: Action) -> None:
    limits = replace(LIMITS, strategy=strategy, max_retry_after_s=60.0)
    assert after_gate_refusal(limits, now, retry_after) == expected


@pytest.mark.parametrize(
    ("strategy", "deadline", "reserve", "room"),
    [
        ("backoff-then-standard", 900.0, 2.0, True),
        ("backoff-then-standard", 1.5, 2.0, False),  # a 1.5 s deadline and a 2 s reserve: standard at once
        ("backoff-then-standard", 2.0, 2.0, False),
        ("backoff-then-standard", 2.1, 2.0, True),
        ("backoff", 1.5, 2.0, True),  # backoff never falls back: it tries flex whatever the deadline
        ("standard", 1.5, 2.0, True),
    ],
)
def test_no_room_for_flex(strategy: str, deadline: float, reserve: float, room: bool) -> None:
    limits = replace(LIMITS, strategy=strategy, deadline=deadline, standard_reserve_s=reserve)
    assert no_room_for_flex(limits, 0.0) is not room


@pytest.mark.parametrize(("reserve", "now", "step"), [(0.2, 899.85, Step.FALLBACK), (0.2, 899.95, Step.ANSWER),
                                                      (5.0, 899.5, Step.ANSWER)])  # fmt: skip
def test_a_learned_short_reserve_lets_a_fallback_start_later(reserve: float, now: float, step: Step) -> None:
    assert after_flex_wait(replace(LIMITS, standard_reserve_s=reserve), now).step is step


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({}, Action(Step.DROP_TIER, 0.0, "tier_rejected"), id="managed-flex"),
        pytest.param({"managed": False}, ANSWER, id="client-chose-the-tier"),
        pytest.param({"on_flex": False}, ANSWER, id="not-on-flex"),
        pytest.param({"tier_rejected": True}, ANSWER, id="already-rejected"),
        pytest.param({"strategy": "fail"}, Action(Step.DROP_TIER, 0.0, "tier_rejected"), id="any-strategy"),
        pytest.param({"deadline": 0.0}, Action(Step.DROP_TIER, 0.0, "tier_rejected"), id="ignores-deadline"),
    ],
)
def test_next_action_tier_rejected(kwargs: dict[str, Any], expected: Action) -> None:
    assert _action(Outcome.TIER_REJECTED, **kwargs) == expected
