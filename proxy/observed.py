"""What the proxy has seen of upstream lately, per model family: how long the standard tier takes to start
an answer (so a fallback keeps just the time it needs before the client's deadline), and how often flex
said it had no capacity. Pure: the caller passes clock readings."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

KEEP = 256  # standard answers remembered per family
MAX_FAMILIES = 1024  # model names come from clients: past this many, new ones are not remembered
RATE_WINDOW_S = 60.0


@dataclass
class Family:
    standard: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP))
    reserve: float | None = None  # cached; recomputed every few samples
    fresh: int = 0
    flex: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=4096))  # (when, was a 429)


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

    def standard_answer(self, name: str, seconds: float) -> None:
        family = self._family(name)
        family.standard.append(seconds)
        family.fresh += 1
        if family.reserve is None or family.fresh >= 8:
            family.fresh = 0
            p95 = percentile(family.standard, 0.95)
            family.reserve = min(self.cap_s, max(self.floor_s, 2.0 * p95))

    def reserve(self, name: str) -> float:
        family = self._families.get(name)
        if family is None or family.reserve is None:
            return self.initial_s
        return family.reserve

    def flex_attempt(self, name: str, now: float, busy: bool) -> None:
        self._family(name).flex.append((now, busy))

    def flex_busy_rate(self, name: str, now: float) -> float | None:
        """The share of flex attempts in the last minute that got a capacity 429; None when there were none."""
        family = self._families.get(name)
        if family is None:
            return None
        recent = [busy for when, busy in family.flex if now - when <= RATE_WINDOW_S]
        return sum(recent) / len(recent) if recent else None

    def standard_p95(self, name: str) -> float | None:
        family = self._families.get(name)
        return percentile(family.standard, 0.95) if family and family.standard else None

    def names(self) -> list[str]:
        return sorted(self._families)


def percentile(values: deque[float] | list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
