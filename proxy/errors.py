"""One error tree for the proxy, and the OpenAI-shaped envelope every error reaches the client in.

    FlexProxyError
    ├── ClientError               the request itself is wrong (400, 401, 404, 413), or past its client's cap (429)
    │   (AdminKeyNotSet, 403: the control plane beyond loopback without FLEX_PROXY_ADMIN_KEY)
    ├── ShuttingDown              the proxy stopped before the answer came: its drain time ran out (503)
    └── UpstreamError             the upstream could not give an answer (502)
        ├── UpstreamUnreachable   no connection could be made: nothing was sent (502)
        ├── UpstreamDropped       the connection closed or reset before any answer byte (502)
        ├── UpstreamIncomplete    the answer was cut after it began (502)
        ├── FlexBusy              flex stayed without capacity for as long as the request could wait (429)
        └── UpstreamTimeout       no answer within the tier's time (504)
            └── DeadlineExceeded  no answer before the client's own deadline (504)
"""

from __future__ import annotations

import json


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    """The `{"error": {...}}` body the OpenAI API and its SDKs use for every error."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    return json.dumps({"error": error}).encode()


class FlexProxyError(Exception):
    """Base of every error the proxy raises itself; knows its status and envelope."""

    status = 500
    type = "server_error"
    code: str | None = "proxy_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


class ClientError(FlexProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BodyTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class Unauthorized(ClientError):
    status = 401
    code = "invalid_api_key"


class AdminKeyNotSet(ClientError):
    """The control plane is reachable beyond loopback, but no admin key was set to open it."""

    status = 403
    code = "admin_key_not_set"


class NotFound(ClientError):
    status = 404
    code = "unknown_url"


class SpendCapReached(ClientError):
    """A client past its daily standard-tier spend cap asked for something only the standard tier serves."""

    status = 429
    type = "insufficient_quota"
    code = "standard_spend_cap"

    def __init__(self, client: str, cap: float | None, pending: bool = False) -> None:
        if pending:  # below the cap, but the client's requests in flight may reach it: try again in a moment
            super().__init__(
                f"Client {client!r} is close to its standard-tier cap of ${cap or 0:.2f} for today (UTC), and its "
                "requests in flight on the standard tier may reach it; try again when they are answered."
            )
            return
        super().__init__(
            f"Client {client!r} has spent its standard-tier cap of ${cap or 0:.2f} for today (UTC); requests that "
            "can run on flex still do, others wait for tomorrow."
        )


class ShuttingDown(FlexProxyError):
    status = 503
    code = "proxy_shutting_down"


class UpstreamError(FlexProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    outcome = "unreachable"  # the request's outcome label in metrics and logs
    status_class = "connection_error"  # the attempt's label in flexproxy_upstream_attempts_total

    def __init__(
        self, message: str, *, elapsed_s: float = 0.0, code: str | None = None, answered: bool = False
    ) -> None:
        super().__init__(message, code=code)
        self.elapsed_s = elapsed_s  # from sending the request to the failure
        self.answered = answered  # a status line had come: upstream may have accepted the work


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamDropped(UpstreamError):
    code = "upstream_disconnected"


class UpstreamIncomplete(UpstreamError):
    code = "upstream_incomplete"
    outcome = "stream_cut"


class FlexBusy(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "flex_unavailable"
    outcome = "flex_unavailable"
    status_class = "429"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    outcome = "timeout"
    status_class = "timeout"


class DeadlineExceeded(UpstreamTimeout):
    code = "deadline_exceeded"
    outcome = "client_deadline"
