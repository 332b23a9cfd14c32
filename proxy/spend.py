"""Standard-tier spend per client per UTC day, for the optional daily caps of the policy file: checked before every
standard-tier send, counted for every priced standard answer.

A send first takes a hold of what it is expected to cost (the largest of its model family's recent standard
answers) and gives it back, with the real cost, once its answer is priced. The rule (`admit`) keeps the overshoot
of a cap to about one request: a client past its cap is refused; below it, a send goes if what was spent, what
is held and its own estimate fit under the cap, or if nothing else is in flight. This is the process's own
count (scope "process"); `fleet_spend.FleetSpend` keeps the same count in Redis for a whole fleet."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import time
from collections import deque
from collections.abc import Callable
from enum import Enum

DAY_S = 86_400
NANO = 1_000_000_000  # spend is counted in integer nano-USD: exact sums, and Redis counts integers
MAX_NUSD = 10**15  # $1M: no one answer costs more; a price file that says so is clamped
ESTIMATE_WINDOW = 32  # standard answers per family the estimate looks back over
MAX_FAMILIES = 1_024  # model names come from clients: the estimates remember at most this many families
HOLD_TTL_S = 3_600.0  # a hold never given back (its process died) stops counting after this
POLL_S = 0.2  # a send waiting for other processes' holds looks again this often


class Verdict(Enum):
    GO = "go"  # send, with a hold taken
    WAIT = "wait"  # below the cap, but the requests in flight may take it there: wait for one to finish
    OVER = "over"  # the day's spend reached the cap


def to_nusd(usd: float) -> int:
    """USD as integer nano-USD, clamped to [0, MAX_NUSD]; a NaN counts as 0."""
    if not math.isfinite(usd):
        return MAX_NUSD if usd > 0 else 0
    return max(0, min(MAX_NUSD, round(usd * NANO)))


def utc_day(wall: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(wall))


def admit(spent: int, cap: int, held: int, holds: int, estimate: int | None) -> Verdict:
    """The cap's rule, in nano-USD (the Redis script in fleet_spend.py is the same rule, word for word).

    `held` is the sum of the `holds` in flight; `estimate` what this send is expected to cost, None when its
    family has no priced standard answer yet (it then goes only alone)."""
    if spent >= cap:
        return Verdict.OVER
    if holds and (estimate is None or spent + held + estimate > cap):
        return Verdict.WAIT
    return Verdict.GO


def hold_amount(spent: int, cap: int, held: int, estimate: int | None) -> int:
    """What a send holds: its estimate, or with none the rest of the cap, so nothing joins it until it is priced."""
    return estimate if estimate is not None else max(0, cap - spent - held)


class Estimates:
    """The largest of each family's last ESTIMATE_WINDOW standard costs, in nano-USD; at most MAX_FAMILIES."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[int]] = {}

    def add(self, family: str, nusd: int) -> None:
        seen = self._seen.get(family)
        if seen is None:
            if len(self._seen) >= MAX_FAMILIES:
                self._seen.pop(next(iter(self._seen)))  # the oldest family makes room
            seen = self._seen[family] = deque(maxlen=ESTIMATE_WINDOW)
        seen.append(nusd)

    def get(self, family: str) -> int | None:
        seen = self._seen.get(family)
        return max(seen) if seen else None

    def __len__(self) -> int:
        return len(self._seen)


_tokens = itertools.count()
_PROCESS = os.urandom(6).hex()  # hold tokens are unique across the fleet: process id + a counter


def new_token() -> str:
    return f"{_PROCESS}.{next(_tokens)}"


class DailySpend:
    """Standard spend per client for the current UTC day, and the holds of the sends in flight, in this process."""

    scope = "process"

    def __init__(self, wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic) -> None:
        self._wall = wall
        self._clock = clock
        self._day = ""
        self._spent: dict[str, int] = {}
        self._holds: dict[str, dict[str, tuple[int, float]]] = {}  # client -> token -> (nano-USD, expires at)
        self.estimates = Estimates()
        self._settled = asyncio.Event()

    def today(self) -> str:
        day = utc_day(self._wall())
        if day != self._day:
            self._day, self._spent, self._holds = day, {}, {}
        return day

    def tab(self, client: str, cap: float | None, family: str) -> SpendTab:
        return SpendTab(self, client, cap, family)

    async def take(self, client: str, cap: int, estimate: int | None, token: str) -> Verdict:
        """Check the cap for one send, and hold its estimate when it may go."""
        return self.take_local(client, cap, estimate, token)

    def take_local(self, client: str, cap: int, estimate: int | None, token: str, base: int = 0) -> Verdict:
        """The cap's check on this process's count, plus `base` (what the rest of the fleet spent, when known)."""
        self.today()
        holds = self._holds.setdefault(client, {})
        now = self._clock()
        for stale in [t for t, (_, until) in holds.items() if until <= now]:
            del holds[stale]
        spent, held = base + self.spent_nusd(client), sum(amount for amount, _ in holds.values())
        verdict = admit(spent, cap, held, len(holds), estimate)
        if verdict is Verdict.GO:
            holds[token] = (hold_amount(spent, cap, held, estimate), now + HOLD_TTL_S)
        return verdict

    def settle(self, client: str, tokens: list[str], nusd: int, family: str | None) -> None:
        """Give back a request's holds and count what it cost on the standard tier (0 when nothing was priced)."""
        if not tokens and not nusd:
            return  # most requests: no cap, or answered on flex
        self.today()
        holds = self._holds.get(client)
        for token in tokens:
            if holds is not None:
                holds.pop(token, None)
        if nusd:
            self._spent[client] = self._spent.get(client, 0) + nusd
            if family is not None:
                self.estimates.add(family, nusd)
        if tokens:
            self._settled.set()  # wake the sends waiting for a hold to end
            self._settled = asyncio.Event()

    def add(self, client: str, usd: float, family: str | None = None) -> None:
        """Count a priced standard answer that took no hold."""
        self.settle(client, [], to_nusd(usd), family)

    def spent_nusd(self, client: str) -> int:
        self.today()
        return self._spent.get(client, 0)

    async def spent(self, client: str) -> float:
        """Today's standard spend of `client`, in USD."""
        return self.spent_nusd(client) / NANO

    def over(self, client: str, cap: float | None) -> bool:
        """Past the cap by what this process knows now, without asking anyone (the admission of a flex request)."""
        return cap is not None and self.spent_nusd(client) >= to_nusd(cap)

    async def changed(self, timeout_s: float) -> None:
        """Wait until a hold of this process is given back, or `timeout_s`."""
        settled = self._settled
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_s)):
                await settled.wait()

    def seconds_to_midnight(self) -> int:
        return max(1, int(DAY_S - self._wall() % DAY_S))


class SpendTab:
    """One request's standard sends against its client's cap: `allowed()` before each, `settle()` once at the end."""

    __slots__ = ("book", "cap", "client", "family", "settled", "tokens", "verdict")

    def __init__(self, book: DailySpend, client: str, cap: float | None, family: str) -> None:
        self.book = book
        self.client = client
        self.cap = None if cap is None else to_nusd(cap)
        self.family = family
        self.tokens: list[str] = []
        self.verdict: Verdict | None = None  # the last check's: OVER means refused for the rest of the day
        self.settled = False

    async def allowed(self, wait_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> bool:
        """May this request send on the standard tier now? Near the cap it waits up to `wait_s` for the sends in
        flight to be priced; False when the cap is reached (or still may be when the wait is over). A request
        holds once: its re-sends (after a 5xx, a rate limit, a tier rejection) go under the hold it has, since
        only one of its answers is ever priced."""
        if self.cap is None or self.tokens:
            return True
        deadline = clock() + max(0.0, wait_s)
        while True:
            token = new_token()
            self.verdict = await self.book.take(self.client, self.cap, self.book.estimates.get(self.family), token)
            if self.verdict is Verdict.GO:
                self.tokens.append(token)
                return True
            left = deadline - clock()
            if self.verdict is Verdict.OVER or left <= 0:
                return False
            await self.book.changed(min(POLL_S, left))

    def settle(self, standard_usd: float) -> None:
        """Give the holds back and count `standard_usd` (0 when the answer was not on standard or not priced)."""
        if self.settled:
            return
        self.settled = True
        self.book.settle(self.client, self.tokens, to_nusd(standard_usd), self.family if standard_usd > 0 else None)
