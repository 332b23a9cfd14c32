"""The simulator's state, shared by the server thread and the test: script, recordings, counters, stores.

Methods that touch shared state take the lock: tests script and read from their own thread while it serves.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import errors
from .options import Reply, SimOptions, matches, window_busy

_KEPT_RESPONSES = 1000
_KEPT_FILES = 100
# Present from the start so a benchmark reads zeros rather than missing keys; others appear when first counted.
_COUNTERS = (
    "requests", "model_requests", "requested_flex", "ok", "flex_429", "rate_limit_429", "server_error",
    "served_flex", "served_default", "served_priority",
)  # fmt: skip


@dataclass
class RecordedRequest:
    """One request as the simulator received it; `outcome` and `served_tier` are filled in when answered."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    outcome: str = ""
    served_tier: str | None = None

    @property
    def tier(self) -> str | None:
        """The body's `service_tier`, if it has one."""
        value = self.json.get("service_tier") if isinstance(self.json, dict) else None
        return value if isinstance(value, str) else None

    @property
    def model(self) -> str | None:
        value = self.json.get("model") if isinstance(self.json, dict) else None
        return value if isinstance(value, str) else None

    @property
    def stream(self) -> bool:
        return isinstance(self.json, dict) and self.json.get("stream") is True

    def summary(self) -> dict[str, Any]:
        """The request without its body and with authorization redacted, for /_sim/requests."""
        headers = {k: ("present" if k == "authorization" else v) for k, v in self.headers.items()}
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body_bytes": len(self.body),
            "model": self.model,
            "tier": self.tier,
            "stream": self.stream,
            "outcome": self.outcome,
            "served_tier": self.served_tier,
        }


def parse_json(body: bytes) -> Any | None:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def validate(recorded: RecordedRequest, options: SimOptions) -> tuple[int, dict[str, Any], str] | None:
    """Why an unscripted model request is refused, as (status, error body, outcome), or None if it is fine."""
    if not isinstance(recorded.json, dict):
        return 400, errors.invalid_json(), "invalid_request"
    model = recorded.model
    if not model:
        return 400, errors.missing_model(), "invalid_request"
    if not matches(model, options.known_models):
        return 404, errors.model_not_found(model), "model_not_found"
    if recorded.tier == "flex" and not matches(model, options.flex_models):
        return 400, errors.tier_unsupported(), "tier_400"
    return None


class Simulator:
    """Scriptable fake OpenAI upstream state; serve it with `create_sim_app` or `SimServer`.

    `clock` drives the flex capacity windows, so tests can move time by hand.
    """

    def __init__(
        self,
        options: SimOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        record_limit: int = 100_000,
    ) -> None:
        self.options = options or SimOptions()
        self.clock = clock
        self.requests: list[RecordedRequest] = []
        self.counters: dict[str, int] = {}
        self._record_limit = record_limit
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._responses: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._files: OrderedDict[str, tuple[dict[str, Any], bytes]] = OrderedDict()
        self._start = clock()
        self.reset()

    def script(self, *replies: Reply) -> None:
        """Queue replies; each is used, in order, by the next request to a model endpoint."""
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        """Forget the script, recorded requests and counters, and reseed the random draws."""
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.counters.clear()
            self.counters.update(dict.fromkeys(_COUNTERS, 0))
            self._rng = random.Random(self.options.seed)

    @property
    def pending(self) -> int:
        """How many scripted replies are still queued."""
        with self._lock:
            return len(self._script)

    def stats(self) -> dict[str, int]:
        """A consistent copy of the counters."""
        with self._lock:
            return dict(self.counters)

    def window(self, now: float | None = None) -> int:
        """The capacity window `now` (default: the clock) falls in, counted from the simulator's start."""
        elapsed = (self.clock() if now is None else now) - self._start
        return math.floor(elapsed / self.options.burst_s)

    def flex_busy(self, now: float | None = None) -> bool:
        """Whether flex capacity is busy in the window of `now`."""
        options = self.options
        return window_busy(options.seed, self.window(now), options.flex_busy_share)

    def record(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> RecordedRequest:
        recorded = RecordedRequest(method, path, query, headers, body, parse_json(body))
        with self._lock:
            self.requests.append(recorded)
            if len(self.requests) > self._record_limit:
                # Drop a tenth at once so a long benchmark does not pay a list shift per request.
                del self.requests[: max(1, self._record_limit // 10)]
            self.counters["requests"] += 1
        return recorded

    def pop_script(self) -> Reply | None:
        """The next scripted reply, or None when the script is empty."""
        with self._lock:
            return self._script.popleft() if self._script else None

    def draw_reply(self, requested_tier: str | None) -> Reply:
        """An unscripted reply drawn from the options: rate limit, server error, flex busy, else ok."""
        options = self.options
        busy = requested_tier == "flex" and self.flex_busy()
        with self._lock:
            rng = self._rng
            if rng.random() < options.rate_limit_share:
                return Reply("rate_limit_429")
            if rng.random() < options.error_share:
                return Reply("server_error", status=rng.choice((500, 503)))
            if busy and rng.random() < options.busy_reject_share:
                return Reply("flex_429")
        return Reply("ok")

    def count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self.counters[name] = self.counters.get(name, 0) + 1

    def store_response(self, response: dict[str, Any]) -> None:
        with self._lock:
            self._responses[response["id"]] = response
            while len(self._responses) > _KEPT_RESPONSES:
                self._responses.popitem(last=False)

    def stored_response(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._responses.get(response_id)

    def store_file(self, meta: dict[str, Any], content: bytes) -> None:
        with self._lock:
            self._files[meta["id"]] = (meta, content)
            while len(self._files) > _KEPT_FILES:
                self._files.popitem(last=False)

    def stored_file(self, file_id: str) -> tuple[dict[str, Any], bytes] | None:
        with self._lock:
            return self._files.get(file_id)
