"""What the simulated upstream does: run-wide options, one scripted reply, and the flex capacity model."""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass

REPLY_KINDS = frozenset(
    {
        "ok",
        "flex_429",
        "rate_limit_429",
        "quota_429",
        "tier_400",
        "server_error",
        "hang",
        "drop",
        "cut_stream",
        "stream_error",
        "slow",
        "reset",
        "stall",
        "slow_first_token",
        "malformed_event",
        "no_done",
        "prelude_then_error",
    }
)
# Kinds whose work the simulated upstream starts, so they are billed (shared OpenAI reference, section 9);
# reset and drop are accepted only after a silence (delay_s > 0), a raw body only with a status below 400.
ACCEPTED_KINDS = frozenset(
    {"ok", "slow", "hang", "cut_stream", "stall", "slow_first_token", "malformed_event", "no_done"}
)
# Legal SSE event boundaries: the end of the last field line, then an empty line (CRLF, LF or CR each).
# "\r" then "\n" is one line end, not two, so "\r\n" alone is not a boundary.
SEPARATORS = frozenset({"\n\n", "\n\r", "\n\r\n", "\r\r", "\r\r\n", "\r\n\n", "\r\n\r", "\r\n\r\n"})

# A hang that nobody ends still has to end: an hour outlives every test and benchmark.
HANG_DEFAULT_S = 3600.0


@dataclass(frozen=True)
class SimOptions:
    """Behaviour of unscripted requests; replace the whole object at run time with `dataclasses.replace`."""

    flex_busy_share: float = 0.0
    burst_s: float = 5.0
    # A deterministic pattern besides the random windows: flex busy for the first `busy_for_s` of every
    # `busy_period_s`, counted from the simulator's start or its last reset (0 = no pattern).
    busy_period_s: float = 0.0
    busy_for_s: float = 0.0
    busy_reject_share: float = 1.0
    rate_limit_share: float = 0.0
    rate_limit_retry_ms: int = 200
    error_share: float = 0.0
    latency_standard_s: float = 0.0
    latency_flex_s: float = 0.0
    stream_events: int = 8
    event_interval_s: float = 0.0
    cached_share: float = 0.0
    completion_tokens: int = 20
    reasoning_tokens: int = 0
    flex_models: tuple[str, ...] = ("o3*", "o4-mini*", "gpt-5*")
    known_models: tuple[str, ...] = ("o3*", "o4-mini*", "gpt-5*", "gpt-4*", "text-embedding-*")
    api_key: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        shares = ("flex_busy_share", "busy_reject_share", "rate_limit_share", "error_share", "cached_share")
        for name in shares:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.burst_s <= 0:
            raise ValueError(f"burst_s must be positive, got {self.burst_s}")
        if self.busy_period_s < 0 or self.busy_for_s < 0:
            raise ValueError(f"busy_period_s and busy_for_s must not be negative, got {self.busy_period_s}, "
                             f"{self.busy_for_s}")  # fmt: skip
        if self.busy_for_s > self.busy_period_s:
            raise ValueError(f"busy_for_s ({self.busy_for_s}) must not exceed busy_period_s ({self.busy_period_s})")
        counts = ("rate_limit_retry_ms", "latency_standard_s", "latency_flex_s", "stream_events")
        for name in (*counts, "event_interval_s", "completion_tokens", "reasoning_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass(frozen=True)
class Reply:
    """One scripted answer for the next model request; `kind` says what happens.

    ok, slow: an answer after `delay_s` (and the tier's latency); the error kinds: that error after `delay_s`.
    hang: silent for `delay_s` (default an hour) or until `Simulator.release_hangs()`, then the connection closes.
    drop / reset: after a silence of `delay_s`, close the connection without a byte (FIN / RST).
    cut_stream: the opening events and `events` deltas (a non-stream answer: half its body), then a close.
    stall: the opening events and `events` deltas, silence for `delay_s` (default an hour, or until released),
    then the rest (a non-stream answer: half its body, the silence, the rest).
    slow_first_token: a stream's headers at once, its first event after `delay_s` (non-stream: like ok).
    malformed_event: a normal stream with one event whose data is not JSON in the middle (non-stream: ok).
    no_done: a complete chat stream (finish_reason, usage if asked) without `data: [DONE]`, sent with
    `connection: close` and ended cleanly (non-stream: ok).
    stream_error: a 200 stream that starts with the flex capacity error in-band.
    prelude_then_error: the same error after a Responses stream's `response.created` and
    `response.in_progress` and an SSE comment (chat: after the comment alone).
    `separator` ends every event of a stream (any legal SSE boundary); `accepted` overrides `accepts_work`.
    """

    kind: str = "ok"
    status: int | None = None
    retry_after_ms: int | None = None
    retry_after_s: float | None = None
    delay_s: float = 0.0
    served_tier: str | None = None
    usage: dict[str, int] | None = None
    events: int | None = None
    event_interval_s: float | None = None
    body: bytes | None = None
    headers: dict[str, str] | None = None
    separator: str = "\n\n"
    accepted: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in REPLY_KINDS:
            raise ValueError(f"unknown reply kind {self.kind!r}; expected one of {sorted(REPLY_KINDS)}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must not be negative, got {self.delay_s}")
        unknown = set(self.usage or {}) - {"input", "cached", "output", "reasoning"}
        if unknown:
            raise ValueError(f"unknown usage keys {sorted(unknown)}")
        if self.separator not in SEPARATORS:
            raise ValueError(f"separator {self.separator!r} is not a legal SSE event boundary")

    @property
    def accepts_work(self) -> bool:
        """Whether upstream would have started (and billed) this work; `accepted` overrides the rule."""
        if self.accepted is not None:
            return self.accepted
        if self.body is not None:
            return (self.status or 200) < 400
        if self.kind in ("reset", "drop"):
            return self.delay_s > 0
        return self.kind in ACCEPTED_KINDS and (self.status or 200) < 400


@dataclass(frozen=True)
class Canned:
    """A fixed answer to every request for one raw path, for pass-through checks.

    `headers` are sent as given (a str value goes out as UTF-8 bytes); `content-length` is always the full
    body's. With `cut_at`, only that many body bytes are sent before the connection closes. HEAD gets the
    headers alone.
    """

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    cut_at: int | None = None

    def __post_init__(self) -> None:
        if self.cut_at is not None and not 0 <= self.cut_at < len(self.body):
            raise ValueError(f"cut_at must be below the body's length {len(self.body)}, got {self.cut_at}")


def window_busy(seed: int, window: int, busy_share: float) -> bool:
    """Whether flex is busy in capacity window `window`; a pure function of (seed, window)."""
    if busy_share <= 0.0:
        return False
    # A hash rather than a shared RNG, so the answer does not depend on how many requests came before.
    digest = hashlib.blake2b(f"{seed}:{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < busy_share


def periodic_busy(elapsed_s: float, period_s: float, busy_for_s: float) -> bool:
    """Whether flex is busy `elapsed_s` after the epoch when it is busy for the first `busy_for_s` of every
    `period_s` (a period of 0: never)."""
    return period_s > 0 and elapsed_s % period_s < busy_for_s


def matches(model: str, patterns: tuple[str, ...]) -> bool:
    """Whether `model` matches one of the fnmatch `patterns` (case-sensitive, as OpenAI model ids are)."""
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


def served_tier(requested: str | None) -> str:
    """The tier OpenAI reports for a requested one: priority for fast/priority, flex for flex."""
    if requested == "flex":
        return "flex"
    if requested in ("priority", "fast"):
        return "priority"
    return "default"
