"""The flex gate: one shared view of flex capacity per model family, so requests stop discovering a busy
flex pool one 429 at a time.

Open, flex requests go straight through. A flex-capacity 429 makes the gate busy: new flex requests wait in
it, and one waiting request at a time is sent as a probe, at backoff intervals. A probe that is answered, or
that has gone a while without being refused (flex refuses at once, while a flex answer may take minutes), opens
the gate and releases the waiters in a ramp (1, 2, 4, ... per step) so they do not knock flex over again.
`GateState` is the pure state machine (clock readings and random numbers passed in); `FlexGate` puts asyncio
futures and timers around it.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


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


@dataclass(eq=False)
class Waiter:
    """One request waiting in a gate; `probe` says how it was let through."""

    attempts: int = 0  # flex attempts the request has made: probes go to those that made fewest
    probe: bool = False
    released: bool = False
    payload: Any = None  # the async layer's future


@dataclass
class GateState:
    """The gate's state machine. Every method is given the clock reading; nothing here waits or does I/O."""

    config: GateConfig
    state: State = State.OPEN
    queue: deque[Waiter] = field(default_factory=deque)
    probing: Waiter | None = None
    next_probe_at: float = 0.0
    failed_probes: int = 0
    ramp: int = 1  # waiters released in the next ramp batch
    next_ramp_at: float = 0.0
    in_flight: int = 0
    refusals: deque[float] = field(default_factory=lambda: deque(maxlen=16))  # recent times to a flex 429
    transitions: list[State] = field(default_factory=list)  # for the caller to report, then clear

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
        self.queue.append(waiter)
        return True

    def leave(self, waiter: Waiter) -> None:
        """A waiter stops waiting (deadline, client gone) or a released one never reports back."""
        if waiter in self.queue:
            self.queue.remove(waiter)
        if self.probing is waiter:
            self.probing = None

    def record(
        self,
        result: Result,
        *,
        probe: bool,
        now: float,
        retry_after: float | None,
        rand: float,
        latency: float | None = None,
    ) -> None:
        """What one flex attempt found; only probes and the first 429 on an open gate change the state."""
        if result is Result.BUSY:
            if latency is not None:
                self.refusals.append(latency)
            if probe:
                self.failed_probes += 1
                self.probing = None
                self._schedule_probe(now, retry_after, rand)
            elif self.state is State.OPEN:
                self._move(State.BUSY)
                self.failed_probes = 0
                self._schedule_probe(now, retry_after, rand)
            elif retry_after is not None:  # upstream asked the pool to wait: no probe before that
                self.next_probe_at = max(self.next_probe_at, now + min(retry_after, self.config.max_retry_after_s))
        elif probe:
            self.probing = None
            if result is Result.OK:
                self._move(State.OPEN)
                self.failed_probes = 0
                self.ramp = 1
                self.next_ramp_at = now
            else:
                self.next_probe_at = max(self.next_probe_at, now + self.config.probe_min_s)

    def accept_after(self) -> float:
        """How long a probe must go unrefused to count as accepted: flex refuses at once, so a few times the
        slowest refusal seen lately, and never less than the configured time."""
        return max(self.config.accept_after_s, 3.0 * max(self.refusals, default=0.0))

    def accept(self, waiter: Waiter, now: float) -> bool:
        """The probe `waiter` has gone `accept_after` without a refusal: open the gate and start the ramp. Its own
        answer, when it comes, counts as any request's."""
        if self.probing is not waiter:
            return False
        self.probing = None
        waiter.probe = False
        self._move(State.OPEN)
        self.failed_probes = 0
        self.ramp = 1
        self.next_ramp_at = now
        return True

    def due(self, now: float) -> tuple[list[Waiter], float | None]:
        """Waiters to let through now, and when to look again (None: when something is recorded)."""
        released: list[Waiter] = []
        cap = self.config.max_in_flight
        room = (cap - self.in_flight) if cap else math.inf
        if self.state is State.BUSY:
            if self.probing is None and self.queue and room > 0:
                if now < self.next_probe_at:
                    return released, self.next_probe_at
                # The probe is a real request: the one with the fewest flex attempts so far (the oldest of those),
                # so probes spread over the waiters instead of using up one request's attempts.
                waiter = min(self.queue, key=lambda w: w.attempts)
                self.queue.remove(waiter)
                waiter.probe = True
                self.probing = waiter
                released.append(waiter)
            return self._let_go(released), None
        if not self.queue or room <= 0:
            return released, None  # nobody waits, or the cap is reached: a place freed will pump again
        if now < self.next_ramp_at:
            return released, self.next_ramp_at
        while self.queue and len(released) < min(self.ramp, room):
            released.append(self.queue.popleft())
        self.ramp *= 2
        self.next_ramp_at = now + self.config.ramp_step_s
        return self._let_go(released), (self.next_ramp_at if self.queue and room > len(released) else None)

    def _let_go(self, released: list[Waiter]) -> list[Waiter]:
        for waiter in released:
            waiter.released = True
        self.in_flight += len(released)
        return released

    def _schedule_probe(self, now: float, retry_after: float | None, rand: float) -> None:
        """Equal jitter: half the cap plus a random half, so a probe never follows at once."""
        config = self.config
        cap = min(config.probe_max_s, config.probe_initial_s * 2.0 ** max(0, self.failed_probes - 1))
        delay = max(cap * (0.5 + 0.5 * rand), config.probe_min_s)
        if retry_after is not None:
            delay = max(delay, min(retry_after, config.max_retry_after_s))
        self.next_probe_at = now + delay

    def _move(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self.transitions.append(state)


class Pass:
    """Leave to send one flex attempt; `done()` once the attempt is over (frees its place under the cap)."""

    __slots__ = ("_gate", "_waiter", "waited_s")

    def __init__(self, gate: FlexGate | None, waiter: Waiter | None, waited_s: float) -> None:
        self._gate: FlexGate | None = gate
        self._waiter = waiter
        self.waited_s = waited_s

    @property
    def probe(self) -> bool:
        """Sent as the gate's probe, and not yet accepted as one (see GateState.accept)."""
        return self._waiter is not None and self._waiter.probe

    def record(self, result: Result, now: float, retry_after: float | None, rand: float, latency: float) -> None:
        gate = self._gate
        if gate is None or (result is Result.OK and not self.probe and gate.core.state is State.OPEN):
            return  # the open path: an answer on an open gate changes nothing
        gate.record(result, self.probe, now, retry_after, rand, latency)

    def done(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.done(self.probe)


class Reporter:
    """What a gate tells the outside world (metrics, logs); these do nothing."""

    def changed(self, gate: FlexGate, moves: list[State]) -> None:
        """After any change: `moves` are the state transitions since the last call (often none)."""

    def probed(self, gate: FlexGate, result: Result) -> None:
        """A probe came back with `result`."""


class FlexGate:
    """A `GateState` with asyncio around it: waiters are futures, the next probe or ramp step a timer."""

    def __init__(self, key: str, config: GateConfig, clock: Callable[[], float], reporter: Reporter) -> None:
        self.key = key
        self.core = GateState(config)
        self._clock = clock
        self._reporter = reporter
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

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

    async def wait(self, until: float, attempts: int = 0) -> Pass | None:
        """Wait to be let through, until the clock reads `until`; None when that passes or the queue is full."""
        now = self._clock()
        if now >= until:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = Waiter(attempts, payload=future)
        if not self.core.enqueue(waiter):
            return None
        self._pump()
        try:
            await asyncio.wait_for(future, until - now)
        except TimeoutError:
            pass
        except BaseException:  # the client left: free the place, and the probe slot if it held it
            self._abandon(waiter)
            raise
        if not waiter.released:
            self._abandon(waiter)
            return None
        return Pass(self, waiter, self._clock() - now)

    def record(
        self, result: Result, probe: bool, now: float, retry_after: float | None, rand: float, latency: float | None
    ) -> None:
        if probe:
            self._reporter.probed(self, result)
        self.core.record(result, probe=probe, now=now, retry_after=retry_after, rand=rand, latency=latency)
        self._report()
        self._pump()

    def done(self, probe: bool) -> None:
        core = self.core
        core.in_flight = max(0, core.in_flight - 1)
        if not probe and not core.queue:
            return  # the open path: nobody is waiting for this place
        if probe and core.probing is not None and core.probing.released:
            # A probe that ended without a verdict (client gone mid-attempt): let another one go.
            core.record(Result.ERROR, probe=True, now=self._clock(), retry_after=None, rand=0.0)
        self._pump()

    def _abandon(self, waiter: Waiter) -> None:
        if waiter.released:
            self.core.in_flight = max(0, self.core.in_flight - 1)
            waiter.released = False
        self.core.leave(waiter)
        self._pump()

    def _pump(self) -> None:
        released, wake_at = self.core.due(self._clock())
        for waiter in released:
            future = waiter.payload
            if not future.done():
                future.set_result(None)
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
            self._reporter.probed(self, Result.OK)
            self._report()
            self._pump()

    def _wake(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._pump()

    def _report(self) -> None:
        moves = self.core.transitions
        if moves:
            self.core.transitions = []
        self._reporter.changed(self, moves)


class Gates:
    """The gates of one proxy, created on first use per key (a model family, or family plus key)."""

    def __init__(self, config: GateConfig, clock: Callable[[], float], reporter: Reporter | None = None) -> None:
        self.config = config
        self._clock = clock
        self._reporter = reporter or Reporter()
        self._gates: dict[str, FlexGate] = {}

    def get(self, key: str) -> FlexGate:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = FlexGate(key, self.config, self._clock, self._reporter)
        return gate

    def __iter__(self) -> Iterator[FlexGate]:
        return iter(list(self._gates.values()))
