"""The flex gate: one shared view of flex capacity per model family, so requests stop discovering a busy
flex pool one 429 at a time.

Open, flex requests go straight through. A flex-capacity 429 makes the gate busy: new flex requests wait in
it, and one waiting request at a time is sent as a probe, at backoff intervals (and, once busy spells have
been seen, not before a share of the shortest recent one has passed). A probe that is answered, or that has
gone a while without being refused (flex refuses at once, while a flex answer may take minutes), opens the
gate and releases the waiters in a ramp (1, 2, 4, ... per step) so they do not knock flex over again.
`GateState` is the pure state machine (clock readings and random numbers passed in); `FlexGate` puts asyncio
futures and timers around it, and `Pass` is one request's leave to send one flex attempt.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_DOUBLINGS = 32  # the probe interval stops doubling here: 2.0 ** n must stay finite however long flex is out
MAX_GATES = 1024  # with gate scope model+key, keys come from clients: past this many, a family's others share one


class State(enum.Enum):
    OPEN = "open"
    BUSY = "busy"


class Result(enum.Enum):
    OK = "ok"  # flex answered: capacity is there
    BUSY = "busy"  # a flex-capacity 429
    ERROR = "error"  # anything else (5xx, timeout, client gone): says nothing about capacity


@dataclass(frozen=True)
class GateConfig:
    probe_initial_s: float = 0.25  # first probe delay cap; doubles per failed probe
    probe_max_s: float = 1.0  # largest probe delay cap
    probe_min_s: float = 0.1  # no two probes closer than this
    accept_after_s: float = 0.5  # a probe not refused by then counts as accepted (at least 3x the slowest refusal)
    max_retry_after_s: float = 60.0  # an upstream retry-after above this is capped for probing
    ramp_step_s: float = 0.05  # time between two ramp batches once open
    max_waiting: int = 10_000  # past this many waiters, a request takes its strategy's next step
    max_in_flight: int = 0  # flex requests in flight per gate; 0 = no cap
    spell_share: float = 0.8  # no probe before this share of the shortest recent busy spell has passed (0: off)
    spells_kept: int = 8  # busy spells remembered
    needs_lease: bool = False  # in a fleet: a probe needs the fleet's lease (see proxy/fleet.py)


@dataclass(eq=False)
class Waiter:
    """One request waiting in a gate. The queue is kept in arrival order, so a request that waits again after
    its probe was refused keeps its place at the front."""

    arrived: float = 0.0
    released: bool = False
    probe: bool = False  # released as the gate's probe (its verdict may already be in)
    released_at: float = 0.0
    payload: Any = None  # the async layer's future


def _arrival(waiter: Waiter) -> float:
    return waiter.arrived


@dataclass
class GateState:
    """The gate's state machine. Every method is given the clock reading; nothing here waits or does I/O."""

    config: GateConfig
    state: State = State.OPEN
    queue: list[Waiter] = field(default_factory=list)
    verdict: Waiter | None = None  # the probe whose verdict the gate awaits: at most one at a time
    next_probe_at: float = 0.0
    failed_probes: int = 0
    busy_since: float = 0.0
    spells: deque[float] = field(default_factory=lambda: deque(maxlen=8))  # recent busy spells, in seconds
    ramp: int = 1  # waiters released in the next ramp batch
    next_ramp_at: float = 0.0
    in_flight: int = 0
    refusals: deque[float] = field(default_factory=lambda: deque(maxlen=16))  # recent times to a flex 429
    transitions: list[State] = field(default_factory=list)  # for the caller to report, then clear
    # In a fleet (shared state), a probe needs the fleet's lease: one probe per gate at a time across processes.
    needs_lease: bool = False
    leased_until: float = 0.0  # the lease is held for the next probe (good for one) until then
    lease_wanted: bool = False  # a probe is due and waits for the lease: for the caller to ask, then clear

    def __post_init__(self) -> None:
        self.spells = deque(self.spells, maxlen=max(1, self.config.spells_kept))
        self.needs_lease = self.needs_lease or self.config.needs_lease

    def admit(self) -> bool:
        """The open path: go now, without waiting, when the gate is open, nobody waits and the cap allows."""
        return (
            self.state is State.OPEN
            and not self.queue
            and (not self.config.max_in_flight or self.in_flight < self.config.max_in_flight)
        )

    def enqueue(self, waiter: Waiter) -> bool:
        if len(self.queue) >= self.config.max_waiting:
            return False
        bisect.insort(self.queue, waiter, key=_arrival)
        return True

    def leave(self, waiter: Waiter) -> None:
        """A waiter stops waiting (deadline, client gone) or a released one ends without a verdict."""
        if waiter in self.queue:
            self.queue.remove(waiter)
        if self.verdict is waiter:
            self.verdict = None  # no verdict: another probe may go after the minimum gap

    def record(
        self,
        result: Result,
        waiter: Waiter | None,
        *,
        now: float,
        retry_after: float | None,
        rand: float,
        latency: float | None = None,
    ) -> None:
        """What one flex attempt found. `waiter` is the request's own place (None on the open path): only the
        awaited probe's verdict, and a first 429 while open, change the state."""
        is_verdict = waiter is not None and self.verdict is waiter
        if is_verdict:
            self.verdict = None
        if result is Result.BUSY:
            if latency is not None and math.isfinite(latency):
                self.refusals.append(max(0.0, latency))
            if is_verdict:
                self.failed_probes += 1
                self._schedule_probe(now, retry_after, rand)
            elif self.state is State.OPEN:
                self.refused(now, retry_after, rand)
            elif retry_after is not None:  # upstream asked the pool to wait: no probe before that
                self.next_probe_at = max(self.next_probe_at, now + self._capped(retry_after))
        elif is_verdict:
            assert waiter is not None
            if result is Result.OK:
                self.opened(now, spell_end=waiter.released_at)
            else:
                self.next_probe_at = max(self.next_probe_at, now + self.config.probe_min_s)

    def refused(self, now: float, retry_after: float | None, rand: float) -> None:
        """Flex refused a request while the gate was open: busy, and the first probe scheduled."""
        if self.state is State.BUSY:
            return
        self._move(State.BUSY)
        self.busy_since = now
        self.failed_probes = 0
        self._schedule_probe(now, retry_after, rand)

    def probe_refused_elsewhere(self, now: float, next_in: float, failed: int) -> None:
        """Another process's probe was refused: busy (if this process missed it), its backoff taken over, and no
        probe here before the next one is due."""
        if self.state is State.OPEN:
            self._move(State.BUSY)
            self.busy_since = now
        self.failed_probes = max(self.failed_probes, min(max(failed, 0), 1 << 30))
        self.next_probe_at = max(self.next_probe_at, now + self._capped(next_in))

    def opened(self, now: float, spell_end: float | None = None) -> None:
        """Flex has capacity again: open, and start the ramp. `spell_end` is when the busy spell was last seen
        to be over (the send time of the probe that got through), remembered to pace the next spell's probes."""
        if self.state is State.OPEN:
            return
        end = now if spell_end is None else spell_end
        if end >= self.busy_since:
            self.spells.append(end - self.busy_since)
        self._move(State.OPEN)
        self.verdict = None
        self.failed_probes = 0
        self.ramp = 1
        self.next_ramp_at = now

    def accept_after(self) -> float:
        """How long a probe must go unrefused to count as accepted: flex refuses at once, so a few times the
        slowest refusal seen lately, and never less than the configured time."""
        return max(self.config.accept_after_s, 3.0 * max(self.refusals, default=0.0))

    def accept(self, waiter: Waiter, now: float) -> bool:
        """The probe `waiter` has gone `accept_after` without a refusal: open the gate and start the ramp. Its own
        answer, when it comes, counts as any request's."""
        if self.verdict is not waiter:
            return False
        self.opened(now, spell_end=waiter.released_at)
        return True

    def due(self, now: float) -> tuple[list[Waiter], float | None]:
        """Waiters to let through now, and when to look again (None: when something is recorded)."""
        released: list[Waiter] = []
        cap = self.config.max_in_flight
        room = (cap - self.in_flight) if cap else math.inf
        if self.state is State.BUSY:
            if self.verdict is None and self.queue and room > 0:
                if now < self.next_probe_at:
                    return released, self.next_probe_at
                if self.needs_lease and now >= self.leased_until:
                    self.lease_wanted = True  # the caller asks the fleet, and looks again with its answer
                    return released, None
                self.leased_until = 0.0
                # The probe is a real request: the one that has waited longest.
                waiter = self.queue.pop(0)
                waiter.probe = True
                self.verdict = waiter
                released.append(waiter)
            return self._let_go(released, now), None
        if not self.queue or room <= 0:
            return released, None  # nobody waits, or the cap is reached: a place freed will pump again
        if now < self.next_ramp_at:
            return released, self.next_ramp_at
        count = int(min(self.ramp, room, len(self.queue)))
        released, self.queue[:count] = self.queue[:count], []
        self.ramp = min(self.ramp * 2, self.config.max_waiting + 1)
        self.next_ramp_at = now + self.config.ramp_step_s
        return self._let_go(released, now), (self.next_ramp_at if self.queue and room > len(released) else None)

    def _let_go(self, released: list[Waiter], now: float) -> list[Waiter]:
        for waiter in released:
            waiter.released = True
            waiter.released_at = now
        self.in_flight += len(released)
        return released

    def _capped(self, retry_after: float) -> float:
        if not math.isfinite(retry_after):
            return self.config.max_retry_after_s
        return min(max(0.0, retry_after), self.config.max_retry_after_s)

    def _schedule_probe(self, now: float, retry_after: float | None, rand: float) -> None:
        """Equal jitter: half the cap plus a random half, so a probe never follows at once. The cap doubles per
        failed probe up to `probe_max_s`; no probe goes before `spell_share` of the shortest recent busy spell
        (flex tends to stay away about as long as it did before), nor before upstream's retry-after."""
        config = self.config
        doublings = min(max(0, self.failed_probes - 1), MAX_DOUBLINGS)
        cap = min(config.probe_max_s, config.probe_initial_s * 2.0**doublings)
        rand = min(max(rand, 0.0), 1.0) if math.isfinite(rand) else 1.0
        at = now + max(cap * (0.5 + 0.5 * rand), config.probe_min_s)
        if self.spells and config.spell_share > 0:
            at = max(at, self.busy_since + config.spell_share * min(self.spells))
        if retry_after is not None:
            at = max(at, now + self._capped(retry_after))
        self.next_probe_at = at

    def _move(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self.transitions.append(state)


class Pass:
    """Leave to send one flex attempt. `record` tells the gate what the attempt found, `done` gives the place
    back; each counts once, whatever order and however often they are called."""

    __slots__ = ("_gate", "_recorded", "_waiter", "waited_s")

    def __init__(self, gate: FlexGate | None, waiter: Waiter | None, waited_s: float) -> None:
        self._gate: FlexGate | None = gate
        self._waiter = waiter
        self._recorded = False
        self.waited_s = waited_s

    @property
    def probe(self) -> bool:
        """Let through as the gate's probe."""
        return self._waiter is not None and self._waiter.probe

    def record(self, result: Result, now: float, retry_after: float | None, rand: float, latency: float) -> None:
        gate = self._gate
        if gate is None or self._recorded:
            return
        self._recorded = True
        if result is Result.OK and self._waiter is None and gate.core.state is State.OPEN:
            return  # the open path: an answer on an open gate changes nothing
        gate.record(result, self._waiter, now, retry_after, rand, latency)

    def done(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.done(self._waiter)


class Reporter:
    """What a gate tells the outside world (metrics, logs); these do nothing."""

    def changed(self, gate: FlexGate, moves: list[State]) -> None:
        """After any change: `moves` are the state transitions since the last call (often none)."""

    def probed(self, gate: FlexGate, result: Result) -> None:
        """A probe came back with `result` (the gate's state already says what it made of it)."""

    def lease(self, gate: FlexGate) -> None:
        """A probe is due and the gate needs the fleet's lease for it: set `gate.core.leased` (or move
        `next_probe_at`) and `gate.pump()` once the fleet has answered."""


class FlexGate:
    """A `GateState` with asyncio around it: waiters are futures, the next probe or ramp step a timer."""

    def __init__(self, key: str, config: GateConfig, clock: Callable[[], float], reporter: Reporter) -> None:
        self.key = key
        self.core = GateState(config)
        self._clock = clock
        self._reporter = reporter
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.remote = False  # true while applying what another process saw (so it is not told back)

    def try_pass(self) -> Pass | None:
        """The open path, no await: a pass now, or None when the request must wait."""
        core = self.core
        if core.admit():
            core.in_flight += 1
            return Pass(self, None, 0.0)
        return None

    def force_pass(self) -> Pass:
        """A pass whatever the state, for a request that tries flex once and takes what comes (`fail`)."""
        self.core.in_flight += 1
        return Pass(self, None, 0.0)

    async def wait(self, until: float, arrived: float = 0.0) -> Pass | None:
        """Wait to be let through, until the clock reads `until`; None when that passes or the queue is full.

        A plain future and a timer, not `asyncio.wait_for`: on Python 3.11 that can swallow a cancel that races
        the release, and a client that left would still go upstream."""
        now = self._clock()
        if now >= until:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = Waiter(arrived, payload=future)
        if not self.core.enqueue(waiter):
            return None
        timer = loop.call_later(until - now, _settle, future)
        self._pump()
        try:
            await future
        except BaseException:  # the client left: free the place, and the probe slot if it held it
            self._abandon(waiter)
            raise
        finally:
            timer.cancel()
        if not waiter.released:
            self._abandon(waiter)
            return None
        return Pass(self, waiter, self._clock() - now)

    def record(
        self,
        result: Result,
        waiter: Waiter | None,
        now: float,
        retry_after: float | None,
        rand: float,
        latency: float | None,
    ) -> None:
        core = self.core
        verdict = waiter is not None and core.verdict is waiter
        core.record(result, waiter, now=now, retry_after=retry_after, rand=rand, latency=latency)
        if verdict:
            self._reporter.probed(self, result)
        self._report()
        self._pump()

    def apply(self, change: Callable[[GateState, float], None]) -> None:
        """Apply what another process saw (`change(core, now)`); reported as any change, but as remote."""
        self.remote = True
        try:
            change(self.core, self._clock())
            self._report()
        finally:
            self.remote = False
        self._pump()

    def pump(self) -> None:
        """Let through whoever may go now (after the fleet answered a lease request, say)."""
        self._pump()

    def now(self) -> float:
        return self._clock()

    def done(self, waiter: Waiter | None) -> None:
        core = self.core
        core.in_flight = max(0, core.in_flight - 1)
        if waiter is None and not core.queue:
            return  # the open path: nobody is waiting for this place
        if waiter is not None and core.verdict is waiter:
            # A probe that ended without a verdict (its client left mid-attempt): let another one go.
            self.record(Result.ERROR, waiter, self._clock(), None, 0.0, None)
            return
        self._pump()

    def _abandon(self, waiter: Waiter) -> None:
        if waiter.released:
            self.core.in_flight = max(0, self.core.in_flight - 1)
            waiter.released = False
        self.core.leave(waiter)
        self._pump()

    def _pump(self) -> None:
        released, wake_at = self.core.due(self._clock())
        if self.core.lease_wanted:
            self.core.lease_wanted = False
            self._reporter.lease(self)
        for waiter in released:
            _settle(waiter.payload)
            if waiter.probe:
                asyncio.get_running_loop().call_later(self.core.accept_after(), self._accept, waiter)
        self._report()
        if wake_at is not None and wake_at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, wake_at - self._clock()), self._wake)
            self._timer_at = wake_at

    def _accept(self, waiter: Waiter) -> None:
        if self.core.accept(waiter, self._clock()):
            self._report()
            self._reporter.probed(self, Result.OK)
            self._pump()

    def _wake(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._pump()

    def _report(self) -> None:
        moves = self.core.transitions
        if moves:
            self.core.transitions = []
        self._reporter.changed(self, moves)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Gates:
    """The gates of one proxy, one per key (a bounded model-family label, or that plus a key fingerprint),
    created on first use."""

    def __init__(self, config: GateConfig, clock: Callable[[], float], reporter: Reporter | None = None) -> None:
        self.config = config
        self._clock = clock
        self._reporter = reporter or Reporter()
        self._gates: dict[str, FlexGate] = {}

    def get(self, key: str) -> FlexGate:
        gate = self._gates.get(key)
        if gate is None:
            if len(self._gates) >= MAX_GATES and "@" in key:
                key = key.partition("@")[0] + "@other"  # one per family at most past the bound
                gate = self._gates.get(key)
            if gate is None:
                gate = self._gates[key] = FlexGate(key, self.config, self._clock, self._reporter)
        return gate

    def __iter__(self) -> Iterator[FlexGate]:
        return iter(list(self._gates.values()))
