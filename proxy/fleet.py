"""The flex gate across a fleet of proxies, through the shared state (Redis).

A flex-capacity 429 seen by any process makes the family busy for all of them: pushed on a channel, not polled.
One probe per gate at a time across the fleet: a process must hold the gate's lease to send one; the lease lapses
on its own (a process that dies mid-probe does not hold the gate), and after a refused probe its holder keeps
it until the next probe is due, so the fleet probes at one pace. A probe's verdict is pushed too: open, and
every process releases its own waiters in its own ramp; refused, and every process takes over the backoff.
Messages missed (a reconnect, a restart) are made up for by reading each gate's state on every (re)connect and,
while a gate is busy, every `POLL_S`. The open path stays local: nothing here runs while flex is free.
With Redis away, every call fails fast and each process's gate works on its own, as without shared state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import uuid
from collections.abc import Callable
from typing import Any

from .gate import FlexGate, Gates, Reporter, Result, State
from .shared import SharedDown, SharedState

LOG = logging.getLogger("flex_proxy.gate")
CHANNEL = "gates"
POLL_S = 1.0  # while a gate is busy, its shared state is read this often (a missed "open" costs at most this)
STATE_TTL_S = 600  # a gate's shared state outlives its last change by this much
LEASE_MARGIN_S = 1.0  # a probe's lease outlasts the time it takes to be accepted by this much
LOCAL_LEASE_S = 1.0  # with Redis away, a probe due goes on this process's own say-so
MAX_MESSAGE = 4096  # bytes: a message is a few dozen
MAX_GATES_READ = 4096  # gates read at a (re)connect


class Fleet(Reporter):
    """Ties this process's gates to the fleet's: reports local changes to the fleet, applies the fleet's here.

    Wraps the gates' own reporter (metrics, logs), which still hears of every change."""

    def __init__(self, shared: SharedState, inner: Reporter, rand: Callable[[], float] = random.random) -> None:
        self.shared = shared
        self.inner = inner
        self.owner = uuid.uuid4().hex  # this process, in leases and messages
        self.gates: Gates | None = None
        self._rand = rand
        self._asking: set[str] = set()  # gates whose lease request is under way
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None

    def attach(self, gates: Gates) -> None:
        """Listen to the fleet for `gates`; call once the event loop runs (the lifespan)."""
        self.gates = gates
        self.shared.subscribe(CHANNEL, self._message)
        self.shared.on_up(self.catch_up)
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._poller] if self._poller else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- what this process saw, told to the fleet ---------------------------------------------------------------

    def changed(self, gate: FlexGate, moves: list[State]) -> None:
        self.inner.changed(gate, moves)
        if not moves or gate.remote:
            return
        core = gate.core
        if core.state is State.BUSY:
            self._spawn(self._tell(gate.key, "busy", core.next_probe_at - gate.now(), core.failed_probes))
        else:
            self._spawn(self._tell(gate.key, "open", 0.0, 0))

    def probed(self, gate: FlexGate, result: Result) -> None:
        self.inner.probed(gate, result)
        key, core = gate.key, gate.core
        if result is Result.BUSY:
            # Keep the lease until the next probe is due, so no other process probes sooner, and say so.
            hold = max(0.001, core.next_probe_at - gate.now())
            self._spawn(self._renew_and_tell(key, hold, core.failed_probes))
        else:  # answered (the open is told by `changed`) or no verdict: the next probe may go from anywhere
            self._spawn(self._release(key))

    def lease(self, gate: FlexGate) -> None:
        if not self.shared.up:
            gate.core.leased_until = gate.now() + LOCAL_LEASE_S  # local mode: this process probes on its own
            gate.pump()
            return
        if gate.key in self._asking:
            return
        self._asking.add(gate.key)
        self._spawn(self._ask(gate))

    async def _ask(self, gate: FlexGate) -> None:
        """Take the gate's lease for one probe; held by another process, look again when it lapses."""
        key, core = gate.key, gate.core
        ttl = core.accept_after() + LEASE_MARGIN_S
        try:
            if await self.shared.acquire(_lease(key), self.owner, ttl):
                core.leased_until = gate.now() + ttl / 2  # used at once; never past the lease's own expiry
            else:
                left_ms = await self.shared.call(lambda r: r.pttl(self.shared.key(_lease(key), "lease")))
                left = max(0.01, float(left_ms) / 1000) if isinstance(left_ms, int) and left_ms > 0 else 0.01
                core.next_probe_at = max(core.next_probe_at, gate.now() + left + 0.05 * self._rand())
        except SharedDown:
            core.leased_until = gate.now() + LOCAL_LEASE_S  # Redis away: this process probes on its own
        finally:
            self._asking.discard(key)
        gate.pump()

    async def _renew_and_tell(self, key: str, hold: float, failed: int) -> None:
        try:
            await self.shared.renew(_lease(key), self.owner, hold)
        except SharedDown:
            return
        await self._tell(key, "probe", hold, failed)

    async def _release(self, key: str) -> None:
        with contextlib.suppress(SharedDown):
            await self.shared.release(_lease(key), self.owner)

    async def _tell(self, key: str, event: str, next_in: float, failed: int) -> None:
        """Write the gate's state and push the event (busy, probe: refused, open) to every process."""
        state_key = self.shared.key(_tag(key), "state")
        state = "open" if event == "open" else "busy"

        async def write(redis: Any) -> Any:
            # Not one transaction: the index lives in another slot than the gate's keys (Redis Cluster).
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hset(state_key, mapping={"state": state, "failed": failed})
                pipe.expire(state_key, STATE_TTL_S)
                pipe.sadd(self.shared.key("gates", "index"), key)
                pipe.expire(self.shared.key("gates", "index"), STATE_TTL_S)
                return await pipe.execute()

        try:
            await self.shared.call(write)
        except SharedDown:
            return
        message = {"k": key, "e": event, "in": round(max(0.0, next_in), 3), "f": failed, "o": self.owner}
        await self.shared.publish(CHANNEL, json.dumps(message).encode())

    # -- what the fleet saw, applied here -----------------------------------------------------------------------

    def _message(self, data: bytes) -> None:
        if self.gates is None or len(data) > MAX_MESSAGE:
            return
        try:
            message = json.loads(data)
            key, event, owner = message["k"], message["e"], message.get("o")
            next_in = _seconds(message.get("in"))
            failed = int(message.get("f") or 0)
        except (ValueError, KeyError, TypeError):
            return
        if owner == self.owner or not isinstance(key, str) or not key:
            return
        self._apply(key, event, next_in, failed)

    def _apply(self, key: str, event: str, next_in: float, failed: int) -> None:
        assert self.gates is not None
        gate = self.gates.get(key)  # keys are bounded labels; a family not seen here yet gets its gate now
        if event == "open":
            if gate.core.state is State.BUSY:
                gate.apply(lambda core, now: core.opened(now))
        elif event in ("busy", "probe"):
            gate.apply(lambda core, now: core.probe_refused_elsewhere(now, next_in, failed))

    async def catch_up(self) -> None:
        """After a (re)connect: every gate's state as the fleet has it (messages sent meanwhile were lost)."""
        if self.gates is None:
            return
        index = await self.shared.redis.smembers(self.shared.key("gates", "index"))
        keys = {_text(k) for k in index} | {g.key for g in self.gates}
        self._take(await self._read(sorted(keys)[:MAX_GATES_READ]), catching_up=True)

    async def _read(self, keys: list[str]) -> dict[str, tuple[bytes | None, int]]:
        """Each gate's shared state and failed-probe count, in one round trip."""
        async with self.shared.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(self.shared.key(_tag(key), "state"), ["state", "failed"])
            found = await pipe.execute()
        return {key: (state, _int(failed)) for key, (state, failed) in zip(keys, found, strict=True)}

    def _take(self, states: dict[str, tuple[bytes | None, int]], catching_up: bool = False) -> None:
        """Apply the fleet's view where it differs: busy there, or open there while busy here for a while (a gate
        that went busy here a moment ago may not have written its state yet)."""
        assert self.gates is not None
        local = {gate.key: gate for gate in self.gates}
        for key, (state, failed) in states.items():
            gate = local.get(key)
            if state == b"busy" and (gate is None or gate.core.state is State.OPEN):
                self._apply(key, "busy", 0.0, failed)
            elif (
                state == b"open"
                and gate is not None
                and gate.core.state is State.BUSY
                and (catching_up or gate.now() - gate.core.busy_since > POLL_S)
            ):
                self._apply(key, "open", 0.0, 0)

    async def _poll(self) -> None:
        """While a gate is busy, read its shared state now and then: an "open" this process missed is found."""
        while True:
            await asyncio.sleep(POLL_S * (0.75 + 0.5 * self._rand()))
            if self.gates is None or not self.shared.up:
                continue
            busy = [gate.key for gate in self.gates if gate.core.state is State.BUSY]
            if not busy:
                continue
            try:
                states = await self.shared.call(functools.partial(_read_with, self, busy))
            except SharedDown:
                continue
            self._take(states)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _read_with(fleet: Fleet, keys: list[str], redis: Any) -> dict[str, tuple[bytes | None, int]]:
    return await fleet._read(keys)


def _tag(key: str) -> str:
    return "gate:" + key


def _lease(key: str) -> str:
    return _tag(key)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def _seconds(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return 0.0
    return seconds if math.isfinite(seconds) and seconds >= 0 else 0.0
