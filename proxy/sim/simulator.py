"""The simulator's state, shared by the server thread and the test: script, recordings, counters, stores.

Methods that touch shared state take the lock: tests script and read from their own thread while it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from . import errors
from .ledger import Billing
from .options import Canned, Reply, SimOptions, matches, periodic_busy, window_busy
from .payloads import Usage
from .recorded import RecordedRequest, parse_json

__all__ = ["RecordedRequest", "Simulator", "validate"]

_KEPT_RESPONSES = 1000
_KEPT_FILES = 100
# Present from the start so a benchmark reads zeros rather than missing keys; others appear when first counted.
_COUNTERS = (
    "requests", "model_requests", "requested_flex", "ok", "flex_429", "rate_limit_429", "server_error",
    "served_flex", "served_default", "served_priority", "connections",
)  # fmt: skip


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
        self._canned: dict[str, Canned] = {}
        self._billing = Billing()
        self._silences: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
        self._silence_ids = 0
        self._open_connections = 0
        self._start = clock()  # the capacity clock's epoch: set again by every reset
        self.reset()

    def script(self, *replies: Reply) -> None:
        """Queue replies; each is used, in order, by the next request to a model endpoint."""
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        """Forget the script, recordings, counters, billing and canned answers; end silences; reseed; start
        the capacity clock again (windows and the busy period count from here), so a benchmark that resets
        right before its load meets the same pattern every run.

        `open_connections` is left alone: it is the state of the sockets, not a count since the reset.
        """
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.counters.clear()
            self.counters.update(dict.fromkeys(_COUNTERS, 0))
            self._canned.clear()
            self._billing = Billing()
            self._rng = random.Random(self.options.seed)
            self._start = self.clock()
        self.release_hangs()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
        """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return True

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until every recorded request has ended (read billing after this); False on timeout."""

        def settled() -> bool:
            with self._lock:
                return all(recorded.ended.is_set() for recorded in self.requests)

        return self.wait_for(settled, timeout)

    @property
    def pending(self) -> int:
        """How many scripted replies are still queued."""
        with self._lock:
            return len(self._script)

    def stats(self) -> dict[str, int]:
        """A consistent copy of the counters."""
        with self._lock:
            return dict(self.counters)

    def elapsed(self, now: float | None = None) -> float:
        """Seconds from the capacity clock's epoch (the start or the last reset) to `now` (default: the clock)."""
        return (self.clock() if now is None else now) - self._start

    def window(self, now: float | None = None) -> int:
        """The capacity window `now` (default: the clock) falls in, counted from the start or the last reset."""
        return math.floor(self.elapsed(now) / self.options.burst_s)

    def flex_busy(self, now: float | None = None) -> bool:
        """Whether flex capacity is busy at `now`: in a busy random window, or in the busy part of a period."""
        options = self.options
        elapsed = self.elapsed(now)
        return periodic_busy(elapsed, options.busy_period_s, options.busy_for_s) or window_busy(
            options.seed, math.floor(elapsed / options.burst_s), options.flex_busy_share
        )

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

    def set_canned(self, path: str, canned: Canned) -> None:
        """Answer every request whose raw path is `path` with `canned`, until the next reset."""
        with self._lock:
            self._canned[path] = canned

    def canned(self, path: str) -> Canned | None:
        with self._lock:
            return self._canned.get(path)

    # Billing (see ledger.py for the model).

    def accept(self, recorded: RecordedRequest, tier: str, usage: Usage) -> None:
        """The simulator started the work of `recorded`: from here on it is billed."""
        with self._lock:
            recorded.accepted, recorded.usage, recorded.usage_tier = True, usage, tier
            recorded.ledger = self._billing
            self._billing.add_accepted(tier, usage)

    def refuse(self, recorded: RecordedRequest) -> None:
        """`recorded` was answered without doing its work: not billed."""
        with self._lock:
            recorded.accepted = False
            self._billing.refused += 1

    def deliver(self, recorded: RecordedRequest) -> None:
        """The usage of accepted `recorded` was sent in full (once per request)."""
        with self._lock:
            if recorded.ledger is None or recorded.usage is None or recorded.usage_tier is None or recorded.delivered:
                return
            recorded.delivered = True
            recorded.ledger.add_delivered(recorded.usage_tier, recorded.usage)

    def billing(self) -> Billing:
        """A consistent copy of the billing counts since the last reset."""
        with self._lock:
            return self._billing.snapshot()

    def end(self, recorded: RecordedRequest, *, by_peer: bool) -> None:
        """Mark how `recorded` ended: the simulator finished, or the peer closed first; the first call wins."""
        with self._lock:
            if recorded.ended.is_set():
                return
            recorded.ended_at = time.monotonic()
            (recorded.closed_by_peer if by_peer else recorded.finished).set()
            recorded.ended.set()

    # Silences (hang, stall, slow first token, a reset's delay) that the test may end early.

    def add_silence(self, loop: asyncio.AbstractEventLoop, release: asyncio.Event) -> int:
        with self._lock:
            self._silence_ids += 1
            self._silences[self._silence_ids] = (loop, release)
            return self._silence_ids

    def remove_silence(self, token: int) -> None:
        with self._lock:
            self._silences.pop(token, None)

    @property
    def hanging(self) -> int:
        """How many requests are silent right now (hang, stall, slow first token, a reset's delay)."""
        with self._lock:
            return len(self._silences)

    def release_hangs(self) -> int:
        """End every silence going on now (not later ones); returns how many. Safe from any thread."""
        with self._lock:
            waiting = list(self._silences.values())
        for loop, release in waiting:
            # The loop may have closed since; its silences are over then anyway.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(release.set)
        return len(waiting)

    # Connections, counted by the server (SimServer) as the sockets open and close.

    def connection_made(self) -> None:
        with self._lock:
            self._open_connections += 1
            self.counters["connections"] += 1

    def connection_lost(self) -> None:
        with self._lock:
            self._open_connections -= 1

    @property
    def open_connections(self) -> int:
        """TCP connections open to the simulator right now (served by SimServer)."""
        with self._lock:
            return self._open_connections
