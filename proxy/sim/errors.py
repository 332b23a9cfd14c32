"""OpenAI-shaped error bodies the simulated upstream answers with, one builder per failure.

The real flex 429 body is undocumented (see the shared OpenAI reference, section 1). The simulator uses
type "server_error" and code "resource_unavailable", the code one public client checks for.
"""

from __future__ import annotations

from typing import Any

FLEX_UNAVAILABLE_MESSAGE = (
    "Resource Unavailable: flex processing capacity is temporarily unavailable, please retry later."
)


def envelope(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The `{"error": {message, type, param, code}}` envelope every OpenAI error uses."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def flex_unavailable() -> dict[str, Any]:
    """Flex capacity is busy: the 429 this project exists to hide."""
    return envelope(FLEX_UNAVAILABLE_MESSAGE, "server_error", "resource_unavailable")


def rate_limited(model: str, retry_ms: int) -> dict[str, Any]:
    """An ordinary requests-per-minute limit, shared by every tier."""
    message = (
        f"Rate limit reached for {model} in organization org-sim on requests per min (RPM): "
        f"Limit 60, Used 60, Requested 1. Please try again in {retry_ms}ms. "
        "Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    return envelope(message, "requests", "rate_limit_exceeded")


def quota_exceeded() -> dict[str, Any]:
    """Billing says no; no retry helps."""
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
    )
    return envelope(message, "insufficient_quota", "insufficient_quota")


def tier_unsupported() -> dict[str, Any]:
    """service_tier=flex sent for a model that has no flex tier."""
    message = "Invalid service_tier argument: flex is not supported for this model."
    return envelope(message, "invalid_request_error", "invalid_value", "service_tier")


def server_error(status: int) -> dict[str, Any]:
    """A 5xx; 503 uses the documented overload code."""
    if status == 503:
        return envelope("The server is overloaded or not ready yet.", "server_error", "server_is_overloaded")
    return envelope("The server had an error while processing your request. Sorry about that!", "server_error")


def invalid_json() -> dict[str, Any]:
    """The body is not a JSON object."""
    message = (
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
        "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
        "valid JSON.)"
    )
    return envelope(message, "invalid_request_error")


def missing_model() -> dict[str, Any]:
    """The JSON object names no model."""
    return envelope("you must provide a model parameter", "invalid_request_error")


def model_not_found(model: str) -> dict[str, Any]:
    """The model is not one the simulator knows."""
    message = f"The model `{model}` does not exist or you do not have access to it."
    return envelope(message, "invalid_request_error", "model_not_found")


def invalid_api_key() -> dict[str, Any]:
    """The bearer token is missing or wrong (the key itself is never echoed)."""
    return envelope("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


def not_found(what: str) -> dict[str, Any]:
    """A stored object (response, file) with this id does not exist."""
    return envelope(f"{what} not found.", "invalid_request_error")
