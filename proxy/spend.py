"""Standard-tier spend per client for the current UTC day, for the optional daily caps of the policy file.

Kept in memory by each process: a restart, or a second replica, starts its own count (the README says so)."""

from __future__ import annotations

import time
from collections.abc import Callable

DAY_S = 86_400


class DailySpend:
    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._day = -1
        self._spent: dict[str, float] = {}

    def _today(self) -> dict[str, float]:
        day = int(self._wall() // DAY_S)
        if day != self._day:
            self._day, self._spent = day, {}
        return self._spent

    def add(self, client: str, usd: float) -> None:
        spent = self._today()
        spent[client] = spent.get(client, 0.0) + usd

    def spent(self, client: str) -> float:
        return self._today().get(client, 0.0)

    def over(self, client: str, cap: float | None) -> bool:
        return cap is not None and self.spent(client) >= cap

    def seconds_to_midnight(self) -> int:
        return max(1, int(DAY_S - self._wall() % DAY_S))
