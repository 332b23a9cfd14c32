"""proxy.spend (the cap's rule, estimates, this process's count) and proxy.fleet_spend (the same in Redis, for a
fleet and across restarts, and with Redis going away)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis as redis_sync
from redis_server import RedisServer

from proxy.fleet_spend import MAX_PENDING, FleetSpend
from proxy.shared import SharedState
from proxy.spend import (
    ESTIMATE_WINDOW,
    HOLD_TTL_S,
    MAX_FAMILIES,
    MAX_NUSD,
    NANO,
    DailySpend,
    Estimates,
    Verdict,
    admit,
    hold_amount,
    to_nusd,
)

CENT = NANO // 100
FAST = {"retry_initial_s": 0.05, "retry_max_s": 0.2, "health_interval_s": 0.1}
Fleet = Callable[[], Awaitable[FleetSpend]]


@pytest.mark.parametrize(
    ("spent", "cap", "held", "holds", "estimate", "verdict"),
    [
        (0, 2 * CENT, 0, 0, None, Verdict.GO),  # nothing known, nothing in flight: it goes alone
        (0, 2 * CENT, 2 * CENT, 1, None, Verdict.WAIT),  # nothing known and one in flight: wait for its price
        (0, 2 * CENT, CENT, 1, CENT, Verdict.GO),  # 0 + 1 + 1 fits under 2
        (0, 2 * CENT, CENT, 1, CENT + 1, Verdict.WAIT),  # one nano-USD past: wait
        (CENT, 2 * CENT, 0, 0, 5 * CENT, Verdict.GO),  # alone it goes, even if it may pass the cap: one request over
        (2 * CENT - 1, 2 * CENT, 0, 0, CENT, Verdict.GO),  # just under the cap
        (2 * CENT, 2 * CENT, 0, 0, 0, Verdict.OVER),  # at the cap
        (3 * CENT, 2 * CENT, 0, 0, 0, Verdict.OVER),  # past it
        (0, 0, 0, 0, None, Verdict.OVER),  # a cap of 0: standard never
    ],
)
def test_admit(spent: int, cap: int, held: int, holds: int, estimate: int | None, verdict: Verdict) -> None:
    assert admit(spent, cap, held, holds, estimate) is verdict


@pytest.mark.parametrize(
    ("spent", "cap", "held", "estimate", "amount"),
    [(0, 10, 0, 3, 3), (4, 10, 0, None, 6), (4, 10, 2, None, 4), (12, 10, 0, None, 0)],
)
def test_hold_amount(spent: int, cap: int, held: int, estimate: int | None, amount: int) -> None:
    assert hold_amount(spent, cap, held, estimate) == amount


@pytest.mark.parametrize(
    ("usd", "nusd"),
    [(0.0, 0), (0.0125, 12_500_000), (1e-10, 0), (-1.0, 0), (math.nan, 0), (math.inf, MAX_NUSD), (1e12, MAX_NUSD)],
)
def test_to_nusd_clamps(usd: float, nusd: int) -> None:
    assert to_nusd(usd) == nusd


def test_estimates_keep_the_largest_recent_cost_and_a_bounded_number_of_families() -> None:
    estimates = Estimates()
    assert estimates.get("o3") is None
    estimates.add("o3", 5)
    estimates.add("o3", 9)
    estimates.add("o3", 2)
    assert estimates.get("o3") == 9
    for _ in range(ESTIMATE_WINDOW):  # the 9 leaves the window
        estimates.add("o3", 3)
    assert estimates.get("o3") == 3
    for i in range(MAX_FAMILIES):
        estimates.add(f"m{i}", 1)
    assert len(estimates) == MAX_FAMILIES and estimates.get("o3") is None  # the oldest family made room
    estimates.add("one-more", 1)
    assert len(estimates) == MAX_FAMILIES


async def test_local_caps_one_process() -> None:
    spend = DailySpend()
    tab = spend.tab("team", 0.02, "gpt-4.1")
    assert await tab.allowed()
    other = spend.tab("team", 0.02, "gpt-4.1")
    assert not await other.allowed(wait_s=0.05)  # nothing known about the cost: the first goes alone
    assert other.verdict is Verdict.WAIT
    tab.settle(0.0125)
    assert await other.allowed()  # alone again: goes, though 0.0125 + 0.0125 passes 0.02 (one request over)
    third = spend.tab("team", 0.02, "gpt-4.1")
    assert not await third.allowed()  # 0.0125 + held 0.0125 + estimate 0.0125 > 0.02
    other.settle(0.0125)
    assert not await third.allowed() and third.verdict is Verdict.OVER
    assert await spend.spent("team") == pytest.approx(0.025)
    assert await spend.tab("anyone", None, "gpt-4.1").allowed()  # no cap: nothing asked


async def test_a_request_holds_once_so_its_re_sends_never_wait_for_itself() -> None:
    spend = DailySpend()
    tab = spend.tab("team", 0.02, "o3")
    assert await tab.allowed() and await tab.allowed(wait_s=5)  # at once: its own hold does not make it wait
    assert len(tab.tokens) == 1
    tab.settle(0.01)
    assert await spend.spent("team") == pytest.approx(0.01)


async def test_a_waiting_send_goes_as_soon_as_the_one_in_flight_is_priced() -> None:
    spend = DailySpend()
    first = spend.tab("team", 1.0, "o3")
    assert await first.allowed()
    waiting = asyncio.get_running_loop().create_task(spend.tab("team", 1.0, "o3").allowed(wait_s=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    started = time.monotonic()
    first.settle(0.01)
    assert await waiting
    assert time.monotonic() - started < 0.1  # woken by the settle, not by a poll


async def test_settle_is_once_and_gives_holds_back_without_a_price() -> None:
    spend = DailySpend()
    tab = spend.tab("team", 0.02, "o3")
    assert await tab.allowed()
    tab.settle(0.0)  # the request failed: no price, but its hold goes back
    tab.settle(5.0)  # a second settle changes nothing
    assert await spend.spent("team") == 0.0
    assert await spend.tab("team", 0.02, "o3").allowed()


async def test_holds_lapse_and_the_day_turns() -> None:
    now = [1_000_000.0]
    spend = DailySpend(wall=lambda: 86_400.0 * 20_000 + now[0], clock=lambda: now[0])
    assert await spend.tab("team", 0.02, "o3").allowed()  # never settled: its process "died"
    assert not await spend.tab("team", 0.02, "o3").allowed()
    now[0] += HOLD_TTL_S
    assert await spend.tab("team", 0.02, "o3").allowed()
    spend.add("team", 1.0)
    assert spend.over("team", 0.02)
    now[0] += 86_400  # the next UTC day
    assert not spend.over("team", 0.02) and await spend.spent("team") == 0.0


# -- the fleet: two FleetSpends (two processes) on one real Redis --------------------------------------------------


@pytest.fixture
async def fleet(redis_server: RedisServer) -> AsyncIterator[Callable[[], Awaitable[FleetSpend]]]:
    """Start a FleetSpend on the test's Redis: each call is one more process."""
    made: list[tuple[SharedState, FleetSpend]] = []

    async def start() -> FleetSpend:
        shared = SharedState(redis_server.url(), **FAST)  # type: ignore[arg-type]
        spend = FleetSpend(shared)
        await shared.start()
        await spend.start()
        made.append((shared, spend))
        return spend

    yield start
    for shared, spend in made:
        await spend.close()
        await shared.close()


async def settled(spend: FleetSpend, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while spend.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert spend.pending == 0


async def test_the_cap_holds_across_processes(fleet: Fleet) -> None:
    one: FleetSpend = await fleet()
    two: FleetSpend = await fleet()
    first = one.tab("team", 0.02, "gpt-4.1")
    assert await first.allowed()
    second = two.tab("team", 0.02, "gpt-4.1")
    assert not await second.allowed(wait_s=0.3)  # the other process's hold counts: it waited, then gave up
    assert second.verdict is Verdict.WAIT
    waiting = asyncio.get_running_loop().create_task(two.tab("team", 0.02, "gpt-4.1").allowed(wait_s=5))
    first.settle(0.0125)
    assert await waiting  # seen by polling Redis: the hold of process one went back
    assert await one.spent("team") == pytest.approx(0.0125) == await two.spent("team")


async def test_twenty_concurrent_sends_against_a_small_cap(fleet: Fleet) -> None:
    """The scenario of the issue: 20 requests at once, $0.0125 each, against $0.02, over two processes. Each send
    that goes is priced after a short while; those that wait give up after 2 s."""
    one: FleetSpend = await fleet()
    two: FleetSpend = await fleet()

    async def request(spend: FleetSpend) -> bool:
        tab = spend.tab("team", 0.02, "gpt-4.1")
        if not await tab.allowed(wait_s=2):
            tab.settle(0.0)
            return False
        await asyncio.sleep(0.1)  # upstream answers
        tab.settle(0.0125)
        return True

    sent = await asyncio.gather(*(request(one if i % 2 else two) for i in range(20)))
    await settled(one)
    await settled(two)
    spent = await one.spent("team")
    # Sent one at a time near the cap: the first alone (no estimate yet), then one more alone (0.0125 + 0.0125 >
    # 0.02), then none: at most one request's cost over the cap.
    assert sum(sent) == 2 and spent == pytest.approx(0.025)
    assert spent - 0.02 <= 0.0125


async def test_spend_survives_a_restart(fleet: Fleet, redis_server: RedisServer) -> None:
    one: FleetSpend = await fleet()
    one.add("team", 0.03)
    await settled(one)
    again: FleetSpend = await fleet()  # a new process: it knows nothing locally
    tab = again.tab("team", 0.02, "o3")
    assert not await tab.allowed() and tab.verdict is Verdict.OVER
    day = time.strftime("%Y-%m-%d", time.gmtime())
    client = redis_sync.Redis.from_url(redis_server.url())
    assert int(client.get(f"flexproxy:{{spend:{day}:team}}:spent") or 0) == 30_000_000
    assert 86_400 < client.ttl(f"flexproxy:{{spend:{day}:team}}:spent") <= 2 * 86_400


async def test_redis_down_counts_locally_from_the_last_fleet_spend_and_catches_up(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    one: FleetSpend = await fleet()
    two: FleetSpend = await fleet()
    two.add("team", 0.015)
    await settled(two)
    assert await one.spent("team") == pytest.approx(0.015)  # one has seen the fleet's spend
    redis_server.pause()  # answers nothing: down for both, its data kept (a killed Redis without persistence
    # would come back empty)
    tab = one.tab("team", 0.02, "o3")
    assert await tab.allowed()  # local mode: 0.015 known, nothing of its own in flight
    assert not one.shared.up
    tab.settle(0.01)
    two.add("team", 0.002)
    assert one.over("team", 0.02)  # 0.015 seen + 0.01 of its own, without Redis
    assert not await one.tab("team", 0.02, "o3").allowed()
    assert one.pending == 1 and two.pending == 1  # waiting for Redis
    redis_server.resume()
    await settled(one)
    await settled(two)
    assert await one.spent("team") == pytest.approx(0.027)  # 0.015 + 0.01 + 0.002, each once


async def test_a_settle_retried_after_a_lost_reply_counts_once(fleet: Fleet) -> None:
    one: FleetSpend = await fleet()
    one.add("team", 0.01)
    item = one._queue[0]
    await settled(one)
    one._queue.append(item)  # as if the reply had been lost and the same settle went again
    await one.flush()
    assert await one.spent("team") == pytest.approx(0.01)


async def test_settles_waiting_for_redis_are_bounded(fleet: Fleet, redis_server: RedisServer) -> None:
    one: FleetSpend = await fleet()
    redis_server.stop()
    assert await one.tab("x", None, "o3").allowed()
    for i in range(MAX_PENDING):
        one.add(f"c{i % 3}", 0.001)
    assert one.pending == MAX_PENDING
    one.add("c0", 0.001)  # past the bound: merged into a waiting settle of the same client and day
    assert one.pending == MAX_PENDING
    redis_server.start()
    await settled(one, timeout=20)
    assert await one.spent("c0") == pytest.approx(0.001 * (MAX_PENDING // 3 + 1 + 1))
