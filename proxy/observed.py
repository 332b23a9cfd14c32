"""What the proxy has seen of upstream lately, per model family: how long the standard tier takes to answer
(so a fallback keeps just the time it needs before the client's deadline), and how often flex said it had no
capacity. Pure: the caller passes clock readings.

Streamed and whole answers are timed apart: a stream's first event comes long before a whole answer is read,
so a reserve learned from streams would cut a non-streamed fallback short. Family names are bounded by the
caller (a priced family or `other`), so junk model names cannot crowd out a real family."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

KEEP = 256  # standard answers remembered per family
MAX_FAMILIES = 1024  # a second bound behind the caller's: past this many, new names are not remembered
RATE_WINDOW_S = 60.0


@dataclass
class Timings:
    """Recent standard time-to-answer of one kind (streamed or whole) and the reserve it gives."""

    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP))
    reserve: float | None = None  # cached; recomputed every few samples
    fresh: int = 0


@dataclass
class Family:
    whole: Timings = field(default_factory=Timings)
    streamed: Timings = field(default_factory=Timings)
    flex: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=4096))  # (when, was a 429)

    def timings(self, streamed: bool) -> Timings:
        return self.streamed if streamed else self.whole


class Observed:
    """Standard-tier time-to-answer and flex 429s, per family.

    The reserve is twice the recent 95th percentile of standard time-to-answer, between a floor and a cap;
    before any standard answer is seen, the configured value."""

    def __init__(self, initial_s: float, floor_s: float, cap_s: float) -> None:
        self.initial_s = initial_s
        self.floor_s = floor_s
        self.cap_s = cap_s
        self._families: dict[str, Family] = {}

    def _family(self, name: str) -> Family:
        family = self._families.get(name)
        if family is None:
            family = Family()
            if len(self._families) < MAX_FAMILIES:
                self._families[name] = family
        return family

    def standard_answer(self, name: str, seconds: float, streamed: bool = False) -> None:
        """A standard answer took `seconds`: to its first event when `streamed`, else to its last byte."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        timings = self._family(name).timings(streamed)
        timings.seconds.append(seconds)
        timings.fresh += 1
        if timings.reserve is None or timings.fresh >= 8:
            timings.fresh = 0
            p95 = percentile(timings.seconds, 0.95)
            timings.reserve = min(self.cap_s, max(self.floor_s, 2.0 * p95))

    def reserve(self, name: str, streamed: bool = False) -> float:
        family = self._families.get(name)
        reserve = family.timings(streamed).reserve if family is not None else None
        return self.initial_s if reserve is None else reserve

    def flex_attempt(self, name: str, now: float, busy: bool) -> None:
        self._family(name).flex.append((now, busy))

    def flex_busy_rate(self, name: str, now: float) -> float | None:
        """The share of flex attempts in the last minute that got a capacity 429; None when there were none."""
        family = self._families.get(name)
        if family is None:
            return None
        recent = [busy for when, busy in family.flex if now - when <= RATE_WINDOW_S]
        return sum(recent) / len(recent) if recent else None

    def standard_p95(self, name: str, streamed: bool = False) -> float | None:
        family = self._families.get(name)
        seconds = family.timings(streamed).seconds if family is not None else None
        return percentile(seconds, 0.95) if seconds else None

    def names(self) -> list[str]:
        return sorted(self._families)


def percentile(values: deque[float] | list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
