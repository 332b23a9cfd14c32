"""The daily standard spend of every client, counted for the whole fleet in Redis (scope "fleet"): the holds and
the spend of one client's day sit under one hash tag and change in one script, so every check is atomic across
processes and survives restarts. With Redis down, each process checks the cap against the last fleet spend it
saw plus its own spend since, and what it settled meanwhile is written once Redis is back (exactly once)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from .shared import SharedDown, SharedState, stop_then_flush
from .spend import HOLD_TTL_S, NANO, DailySpend, Verdict, new_token

KEY_TTL_S = 2 * 86_400  # a day's spend is kept through the next day, for the status page
OP_TTL_S = 600  # how long a settle's id is remembered, so a retried settle never counts twice
REFRESH_S = 1.0  # a flex request's admission reads the fleet spend at most this stale
MAX_PENDING = 10_000  # settles waiting for Redis; past it they merge per client and day (their holds lapse)
BATCH = 200  # settles per pipeline: each pipeline is one call, well inside the timeout

# KEYS: spent, holds (members "<token>:<nano-USD>", scored by expiry), held (the sum of the holds' amounts).
# ARGV: cap, estimate (-1: none), token, hold ttl ms, key ttl s. The rule is spend.admit's; a hold without an
# estimate holds the rest of the cap. O(log n) in the holds in flight, plus the lapsed ones it clears.
_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms)) do
  redis.call('ZREM', KEYS[2], member)
  redis.call('DECRBY', KEYS[3], string.match(member, ':(%d+)$'))
end
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local cap = tonumber(ARGV[1])
if spent >= cap then return {0, spent} end
local holds = redis.call('ZCARD', KEYS[2])
local held = tonumber(redis.call('GET', KEYS[3]) or '0')
local estimate = tonumber(ARGV[2])
if holds > 0 and (estimate < 0 or spent + held + estimate > cap) then return {1, spent} end
local amount = estimate
if estimate < 0 then amount = math.max(0, cap - spent - held) end
local member = ARGV[3] .. ':' .. string.format('%d', amount)
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[4]), member)
redis.call('INCRBY', KEYS[3], string.format('%d', amount))
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {2, spent, member}
"""
# KEYS: spent, holds, held, the settle's id. ARGV: nano-USD, key ttl s, id ttl s, hold members to give back.
_SETTLE = """
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[3]) then
  return tonumber(redis.call('GET', KEYS[1]) or '0')
end
for i = 4, #ARGV do
  if redis.call('ZREM', KEYS[2], ARGV[i]) == 1 then
    redis.call('DECRBY', KEYS[3], string.match(ARGV[i], ':(%d+)$'))
  end
end
if tonumber(ARGV[1]) > 0 then
  local spent = redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return spent
end
return tonumber(redis.call('GET', KEYS[1]) or '0')
"""


@dataclass
class Settle:
    """One settle on its way to Redis; its id makes a retry harmless."""

    day: str
    client: str
    nusd: int
    members: list[str] = field(default_factory=list)
    op: str = field(default_factory=new_token)
    sent: bool = False  # tried once: Redis may have applied it, so only its own id may go again


@dataclass
class Known:
    """The fleet's spend of one client as last read, and this process's own spend at that moment."""

    day: str
    fleet: int
    local: int
    at: float


class FleetSpend(DailySpend):
    """DailySpend for the fleet, in Redis; the local count underneath is both its fallback and its record."""

    scope = "fleet"

    def __init__(
        self,
        shared: SharedState,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(wall, clock)
        self.shared = shared
        self._take = shared.redis.register_script(_TAKE)
        self._settle = shared.redis.register_script(_SETTLE)
        self._members: dict[str, tuple[str, str]] = {}  # token -> (day, hold member) of holds taken in Redis
        self._known: dict[str, Known] = {}
        self._queue: list[Settle] = []  # waiting to be written, oldest first
        self._wake = asyncio.Event()
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer: asyncio.Task[None] | None = None
        shared.on_up(self.flush)

    @property
    def fleet_scope(self) -> str:
        return "fleet" if self.shared.up else "process"

    def _keys(self, day: str, client: str) -> list[str]:
        """spent, holds and held of one client's day: one hash tag, so one Redis Cluster slot."""
        tag = f"spend:{day}:{client}"
        return [self.shared.key(tag, "spent"), self.shared.key(tag, "holds"), self.shared.key(tag, "held")]

    def _base(self, client: str, day: str) -> int:
        """What the fleet had spent beyond this process's own count, when last read (0 if never, or another day)."""
        known = self._known.get(client)
        return known.fleet - known.local if known is not None and known.day == day else 0

    def _saw(self, client: str, day: str, fleet: int) -> None:
        self._known[client] = Known(day, int(fleet), self.spent_nusd(client), self._clock())

    async def take(self, client: str, cap: int, estimate: int | None, token: str) -> Verdict:
        day = self.today()
        keys = self._keys(day, client)
        args: list[str | int] = [cap, -1 if estimate is None else estimate, token, int(HOLD_TTL_S * 1000), KEY_TTL_S]
        try:
            reply = await self.shared.call(lambda r: self._take(keys=keys, args=args))
        except SharedDown:
            return self.take_local(client, cap, estimate, token, self._base(client, day))
        self._saw(client, day, int(reply[1]))
        if int(reply[0]) == 2:
            member = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
            self._members[token] = (day, member)
            return Verdict.GO
        return Verdict.OVER if int(reply[0]) == 0 else Verdict.WAIT

    def settle(self, client: str, tokens: list[str], nusd: int, family: str | None) -> None:
        super().settle(client, tokens, nusd, family)
        day = self.today()
        members = [m for day_of, m in (self._members.pop(t, ("", "")) for t in tokens) if day_of == day and m]
        if nusd or members:
            self._enqueue(Settle(day, client, nusd, members))

    def _enqueue(self, item: Settle) -> None:
        if len(self._queue) >= MAX_PENDING:
            # Redis has been away for long: keep the money, merged into the newest unsent settle of its client and
            # day; the holds it gave back lapse by themselves (HOLD_TTL_S).
            for waiting in reversed(self._queue):
                if waiting.day == item.day and waiting.client == item.client and not waiting.sent:
                    waiting.nusd += item.nusd
                    return
            self._queue.pop(0)  # the oldest goes; its holds lapse and its money is lost (counted locally still)
        self._queue.append(item)
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def flush(self) -> None:
        """Write what waits, oldest first, in one pipeline; on failure it stays queued, to be retried as is."""
        while self._queue and self.shared.up:
            batch = self._queue[:BATCH]
            for item in batch:
                item.sent = True

            async def write(r: Redis, batch: list[Settle] = batch) -> list[object]:
                async with r.pipeline(transaction=False) as pipe:
                    for item in batch:
                        op_key = self.shared.key(f"spend:{item.day}:{item.client}", "op", item.op)
                        args: list[str | int] = [item.nusd, KEY_TTL_S, OP_TTL_S, *item.members]
                        await self._settle(keys=[*self._keys(item.day, item.client), op_key], args=args, client=pipe)
                    return list(await pipe.execute())

            replies = await self.shared.call(write)
            del self._queue[: len(batch)]
            today = self.today()
            for item, spent in zip(batch, replies, strict=True):
                if item.day == today and isinstance(spent, int):
                    self._saw(item.client, today, spent)

    async def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write())

    async def close(self) -> None:
        """Write what is left (bounded by the timeout), then stop."""
        await stop_then_flush(self._writer, self.flush)
        for task in list(self._tasks):
            task.cancel()

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            with contextlib.suppress(SharedDown):
                await self.flush()

    async def spent(self, client: str) -> float:
        day = self.today()
        spent_key = self._keys(day, client)[0]
        try:
            value = await self.shared.call(lambda r: r.get(spent_key))
        except SharedDown:
            return (self._base(client, day) + self.spent_nusd(client)) / NANO
        fleet = int(value or 0)
        self._saw(client, day, fleet)
        return fleet / NANO

    def over(self, client: str, cap: float | None) -> bool:
        """From the last fleet spend read (refreshed in the background when older than REFRESH_S): no round trip."""
        if cap is None:
            return False
        day = self.today()
        known = self._known.get(client)
        if (known is None or self._clock() - known.at > REFRESH_S) and client not in self._refreshing:
            self._refreshing.add(client)
            task = asyncio.get_running_loop().create_task(self._refresh(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return self._base(client, day) + self.spent_nusd(client) >= round(cap * NANO)

    async def _refresh(self, client: str) -> None:
        try:
            await self.spent(client)
        finally:
            self._refreshing.discard(client)

