"""The daily ledger for the whole fleet, in Redis (scope "fleet"): one hash per UTC day, a field per client, model
family and figure, kept MAX_DAYS + 1 days. `add` stays on the request path, so it only adds to a local buffer; a
background writer sends the buffer about once a second, a day per script that applies it exactly once. With Redis down,
`days` answers from this process's own ledger, and the buffer waits (bounded) until Redis is back."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field, fields
from typing import Literal

from redis.asyncio import Redis

from .ledger import MAX_CELLS, MAX_DAYS, OVERFLOW, Cell, Ledger, Tally, day_range
from .shared import SharedDown, SharedState, stop_then_flush
from .spend import new_token

FLUSH_S = 1.0  # the fleet's totals lag this process's by about this much
KEY_TTL_S = (MAX_DAYS + 1) * 86_400
OP_TTL_S = 600  # how long a batch's id is remembered, so a retried batch never counts twice
_SEP = "|"  # client names and model families never hold it
FIELDS = tuple(f.name for f in fields(Tally))
Days = dict[str, dict[Cell, Tally]]
CELLS_PER_BATCH = 100  # a script call adds at most 900 fields...
BATCHES_PER_CALL = 10  # ...and a call sends at most 10 of them: well inside the timeout

# KEYS: the day's hash, the batch's id. ARGV: key ttl s, id ttl s, then field, increment pairs.
_APPLY = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return 0 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass
class Batch:
    """One day's figures on their way to Redis; its id makes a retry harmless."""

    day: str
    cells: dict[Cell, Tally]
    op: str = field(default_factory=new_token)


class FleetLedger:
    """The `Ledger` interface over Redis, with `local` (this process's ledger) as its fallback."""

    def __init__(self, local: Ledger, shared: SharedState, flush_s: float = FLUSH_S) -> None:
        self.local = local
        self.shared = shared
        self.started = local.started
        # Whose figures the last `days` gave: the fleet's, or (Redis away) this process's own.
        self.scope: Literal["process", "fleet"] = "fleet"
        self._flush_s = flush_s
        self._fresh: dict[str, dict[Cell, Tally]] = {}  # day -> cells not yet sent
        self._sent: list[Batch] = []  # tried once and not confirmed: they go again as they are
        self._apply = shared.redis.register_script(_APPLY)
        self._writer: asyncio.Task[None] | None = None
        shared.on_up(self.flush)


    def _key(self, day: str) -> str:
        return self.shared.key(f"ledger:{day}")

    def add(self, day: str, client: str, model: str, tally: Tally) -> None:
        self.local.add(day, client, model, tally)
        cells = self._fresh.get(day)
        if cells is None:
            cells = self._fresh[day] = {}
            for old in sorted(self._fresh)[:-MAX_DAYS]:  # Redis away for over a month: the oldest day goes
                del self._fresh[old]
        key = (client, model)
        cell = cells.get(key)
        if cell is None:
            if len(cells) >= MAX_CELLS:  # as the local ledger does
                key = OVERFLOW
                cell = cells.get(key)
            if cell is None:
                cell = cells[key] = Tally()
        cell.merge(tally)

    async def flush(self) -> None:
        """Send what waits: first what was tried before (with its own ids), then the fresh cells."""
        if not self._sent:
            for day, cells in sorted(self._fresh.items()):
                items = list(cells.items())
                for start in range(0, len(items), CELLS_PER_BATCH):
                    self._sent.append(Batch(day, dict(items[start : start + CELLS_PER_BATCH])))
            self._fresh = {}
        while self._sent:
            batches = self._sent[:BATCHES_PER_CALL]

            async def write(r: Redis, batches: list[Batch] = batches) -> None:
                async with r.pipeline(transaction=False) as pipe:
                    for batch in batches:
                        args: list[str | int] = [KEY_TTL_S, OP_TTL_S]
                        for (client, model), cell in batch.cells.items():
                            for name in FIELDS:
                                value = getattr(cell, name)
                                if value:
                                    args += [f"{client}{_SEP}{model}{_SEP}{name}", value]
                        op_key = self.shared.key(f"ledger:{batch.day}", "op", batch.op)
                        await self._apply(keys=[self._key(batch.day), op_key], args=args, client=pipe)
                    await pipe.execute()

            await self.shared.call(write)
            del self._sent[: len(batches)]

    async def days(self, count: int, today: str) -> Days:
        """The fleet's `count` days ending at `today`, newest first (a day with nothing is {}), with this
        process's unsent figures; this process's own ledger when Redis does not answer."""
        wanted = day_range(count, today)

        async def read(r: Redis) -> list[dict[bytes, bytes]]:
            async with r.pipeline(transaction=False) as pipe:
                for day in wanted:
                    pipe.hgetall(self._key(day))
                return list(await pipe.execute())

        try:
            hashes = await self.shared.call(read)
        except SharedDown:
            self.scope = "process"
            return await self.local.days(count, today)
        self.scope = "fleet"
        found: Days = {}
        for day, values in zip(wanted, hashes, strict=True):
            cells = _cells(values)
            for batch in [*self._sent, *(Batch(d, c) for d, c in self._fresh.items())]:
                if batch.day == day:
                    for key, cell in batch.cells.items():
                        cells.setdefault(key, Tally()).merge(cell)
            found[day] = cells
        return found

    async def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write())

    async def close(self) -> None:
        """Send what is left (bounded by the timeout), then stop."""
        await stop_then_flush(self._writer, self.flush)

    async def _write(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            if self.shared.up:
                with contextlib.suppress(SharedDown):
                    await self.flush()


def _cells(values: dict[bytes, bytes]) -> dict[Cell, Tally]:
    """A day's hash back into cells; a field it does not know (a newer version's) is skipped."""
    cells: dict[Cell, Tally] = {}
    for raw_field, raw_value in values.items():
        parts = raw_field.decode(errors="replace").split(_SEP)
        if len(parts) != 3 or parts[2] not in FIELDS:
            continue
        try:
            value = int(raw_value)
        except ValueError:
            continue
        cell = cells.setdefault((parts[0], parts[1]), Tally())
        setattr(cell, parts[2], getattr(cell, parts[2]) + value)
    return cells
