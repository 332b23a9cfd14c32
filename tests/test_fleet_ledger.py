"""proxy.fleet_ledger: the daily ledger of a fleet in one real Redis, beside this process's own (proxy.ledger)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis as redis_sync
from redis_server import RedisServer

from proxy.fleet_ledger import KEY_TTL_S, FleetLedger
from proxy.ledger import Ledger, Tally
from proxy.shared import SharedState

FAST = {"retry_initial_s": 0.05, "retry_max_s": 0.2, "health_interval_s": 0.1}
TODAY = "2026-10-12"
Fleet = Callable[[], Awaitable[FleetLedger]]


def tally(**values: int) -> Tally:
    return Tally(requests=1, **values)


@pytest.fixture
async def fleet(redis_server: RedisServer) -> AsyncIterator[Fleet]:
    made: list[tuple[SharedState, FleetLedger]] = []

    async def start() -> FleetLedger:
        shared = SharedState(redis_server.url(), **FAST)  # type: ignore[arg-type]
        ledger = FleetLedger(Ledger(time.time()), shared, flush_s=0.05)
        await shared.start()
        await ledger.start()
        made.append((shared, ledger))
        return ledger

    yield start
    for shared, ledger in made:
        await ledger.close()
        await shared.close()


async def test_two_processes_add_up_in_redis(fleet: Fleet, redis_server: RedisServer) -> None:
    one, two = await fleet(), await fleet()
    for _ in range(3):
        one.add(TODAY, "team", "o3", tally(answered=1, served_flex=1, cost_nusd=4_000, saved_nusd=4_000))
    two.add(TODAY, "team", "o3", tally(answered=1, fallbacks=1, cost_nusd=8_000, lost_nusd=4_000))
    two.add("2026-10-11", "web", "gpt-4.1", tally(answered=1, cost_nusd=100))
    await asyncio.sleep(0.3)  # both flushed
    assert one.scope == "fleet"
    days = await one.days(2, TODAY)
    assert days == await two.days(2, TODAY)
    assert days[TODAY] == {
        ("team", "o3"): Tally(requests=4, answered=4, served_flex=3, fallbacks=1, cost_nusd=20_000,
                              saved_nusd=12_000, lost_nusd=4_000),
    }  # fmt: skip
    assert days["2026-10-11"] == {("web", "gpt-4.1"): Tally(requests=1, answered=1, cost_nusd=100)}
    assert list(await one.days(3, TODAY)) == [TODAY, "2026-10-11", "2026-10-10"]  # every day, {} when empty
    assert (await one.days(3, TODAY))["2026-10-10"] == {}
    ttl = redis_sync.Redis.from_url(redis_server.url()).ttl("flexproxy:{ledger:2026-10-12}")
    assert KEY_TTL_S - 60 < ttl <= KEY_TTL_S


async def test_what_is_not_yet_sent_is_counted_too(fleet: Fleet) -> None:
    one = await fleet()
    one._flush_s = 3600  # the writer waits: nothing is sent
    await asyncio.sleep(0.1)
    one.add(TODAY, "team", "o3", tally(cost_nusd=1))
    assert (await one.days(1, TODAY))[TODAY][("team", "o3")].cost_nusd == 1


async def test_redis_down_answers_from_this_process_and_sends_later_exactly_once(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    one, two = await fleet(), await fleet()
    one.add(TODAY, "team", "o3", tally(cost_nusd=10))
    await asyncio.sleep(0.3)
    redis_server.pause()
    try:
        two.add(TODAY, "team", "o3", tally(cost_nusd=1))
        one.add(TODAY, "team", "o3", tally(cost_nusd=100))
        days = await one.days(1, TODAY)  # Redis does not answer: this process's own figures
        assert one.scope == "process"  # and says so
        assert days[TODAY][("team", "o3")].cost_nusd == 110
        await asyncio.sleep(0.3)  # writes tried and failed meanwhile
    finally:
        redis_server.resume()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (one.shared.up and two.shared.up and not one._sent and not two._sent):
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert (await two.days(1, TODAY))[TODAY][("team", "o3")].cost_nusd == 111
    assert (await one.days(1, TODAY))[TODAY][("team", "o3")].cost_nusd == 111 and one.scope == "fleet"


async def test_a_batch_sent_twice_counts_once(fleet: Fleet) -> None:
    one = await fleet()
    one._flush_s = 3600
    await asyncio.sleep(0.1)
    one.add(TODAY, "team", "o3", tally(cost_nusd=5))
    await one.flush()
    batch = (await one.days(1, TODAY))[TODAY]
    from proxy.fleet_ledger import Batch

    again = Batch(TODAY, {("team", "o3"): tally(cost_nusd=5)})
    one._sent = [again]
    await one.flush()
    one._sent = [again]  # the reply was lost: the same batch goes again
    await one.flush()
    assert (await one.days(1, TODAY))[TODAY][("team", "o3")].cost_nusd == batch[("team", "o3")].cost_nusd + 5
