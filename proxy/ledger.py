"""The daily ledger: requests and money per UTC day, client and model family, which the savings page, `/flex/savings`
and `flex-proxy report` read. Money is whole nano-USD (int), so every sum is exact.

The interface, which a shared-state ledger implements a second time (fleet-wide, per UTC day, expiring); keep both
exactly this small:

    Tally                                   one (UTC day, client, model family) cell; every field an int
    ledger.scope                            "process" (this module: this process since it started) or "fleet"
    ledger.started                          wall time (Unix seconds) the ledger began counting
    ledger.add(day, client, model, tally)   sync, O(1), on the hot path: adds `tally` into the cell
    await ledger.days(count, today)         the `count` UTC days ending at `today` ("YYYY-MM-DD"), newest first,
                                            each {(client, model): Tally}; a day with nothing is {}; copies

`accounting.account` adds one Tally per finished model request, the same numbers the Prometheus counters get, so
the ledger's totals since start equal those counters. Clients and model labels are bounded sets already (client
names from the settings, model labels from `Metrics.model_label`); the ledger bounds itself too: MAX_DAYS days, and
MAX_CELLS cells a day, past which new cells fold into OVERFLOW.
"""

from __future__ import annotations

import datetime
import functools
import time
from dataclasses import dataclass, replace
from typing import Literal, Protocol

DAY_S = 86_400
MAX_DAYS = 31  # days kept, and the most a caller may ask for
MAX_CELLS = 4_096  # (client, model) cells a day
OVERFLOW = ("(other)", "(other)")  # no client name or model label can take this form (parentheses)

Cell = tuple[str, str]  # (client, model label)


@dataclass
class Tally:
    """One (UTC day, client, model family) cell; all ints, money in nano-USD."""

    requests: int = 0  # model requests finished, any outcome
    answered: int = 0  # of which outcome ok
    flex_sent: int = 0  # answered requests that were sent on flex (requested tier flex)
    served_flex: int = 0  # answered on the flex tier
    fallbacks: int = 0  # re-sent on the standard tier after flex stayed unavailable
    unread: int = 0  # accepted upstream, answer never read to its end (flexproxy_unread_answers_total)
    cost_nusd: int = 0  # at the served tier
    saved_nusd: int = 0
    lost_nusd: int = 0

    def merge(self, other: Tally) -> None:
        """Add `other` into this cell."""
        self.requests += other.requests
        self.answered += other.answered
        self.flex_sent += other.flex_sent
        self.served_flex += other.served_flex
        self.fallbacks += other.fallbacks
        self.unread += other.unread
        self.cost_nusd += other.cost_nusd
        self.saved_nusd += other.saved_nusd
        self.lost_nusd += other.lost_nusd


class DailyLedger(Protocol):
    """What the control plane reads and the pipeline adds to; see the module docstring."""

    scope: Literal["process", "fleet"]
    started: float

    def add(self, day: str, client: str, model: str, tally: Tally) -> None: ...

    async def days(self, count: int, today: str) -> dict[str, dict[Cell, Tally]]: ...


class Ledger:
    """This process's ledger, in memory since it started."""

    scope: Literal["process", "fleet"] = "process"

    def __init__(self, started: float) -> None:
        self.started = started
        self._days: dict[str, dict[Cell, Tally]] = {}

    def add(self, day: str, client: str, model: str, tally: Tally) -> None:
        cells = self._days.get(day)
        if cells is None:
            cells = self._days[day] = {}
            if len(self._days) > MAX_DAYS:
                del self._days[min(self._days)]  # ISO dates sort as days do
        key = (client, model)
        cell = cells.get(key)
        if cell is None:
            if len(cells) >= MAX_CELLS:
                key = OVERFLOW
                cell = cells.get(key)
            if cell is None:
                cell = cells[key] = Tally()
        cell.merge(tally)

    async def days(self, count: int, today: str) -> dict[str, dict[Cell, Tally]]:
        return {day: {key: replace(t) for key, t in self._days.get(day, {}).items()} for day in day_range(count, today)}


def day_range(count: int, today: str) -> list[str]:
    """`count` UTC days ending at `today`, newest first; `count` is held between 1 and MAX_DAYS."""
    last = datetime.date.fromisoformat(today)
    return [(last - datetime.timedelta(days=n)).isoformat() for n in range(max(1, min(count, MAX_DAYS)))]


@functools.lru_cache(maxsize=4)  # one new day a day: the name is made once, not once per request
def _day_name(index: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(index * DAY_S))


def utc_day(wall: float) -> str:
    """The UTC day of a wall time, "YYYY-MM-DD"."""
    return _day_name(int(wall // DAY_S))
