"""proxy.fleet: the flex gate shared by a fleet through a real Redis (Debian's redis-server on loopback).

In process: two or three gate sets, each with its own connection to one Redis, as separate proxies would have.
End to end: two real `flex-proxy` processes, one Redis and the simulated upstream."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis_server import RedisServer
from test_fleet import Replica, replicas, until  # noqa: F401 (a fixture)

from proxy.fleet import Fleet
from proxy.gate import FlexGate, GateConfig, Gates, Reporter, Result, State
from proxy.shared import SharedState
from proxy.sim import Reply, Simulator

CONFIG = GateConfig(
    probe_initial_s=0.05, probe_max_s=0.1, probe_min_s=0.01, accept_after_s=5.0, spell_share=0, needs_lease=True
)


class Member:
    """One process's gates, tied to the fleet through its own connection."""

    def __init__(self, url: str, config: GateConfig = CONFIG) -> None:
        self.shared = SharedState(url, prefix="test:", timeout_s=0.5, health_interval_s=0.2, retry_initial_s=0.05,
                                  retry_max_s=0.2)  # fmt: skip
        self.fleet = Fleet(self.shared, Reporter())
        self.gates = Gates(config, time.monotonic, self.fleet)

    async def start(self) -> Member:
        self.fleet.attach(self.gates)
        await self.shared.start()
        return self

    async def close(self) -> None:
        await self.fleet.close()
        await self.shared.close()

    def gate(self) -> FlexGate:
        return self.gates.get("o3")


@pytest.fixture
async def fleet(redis_server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    members: list[Member] = []

    async def join(config: GateConfig = CONFIG) -> Member:
        member = await Member(redis_server.url(), config).start()
        members.append(member)
        return member

    yield join
    for member in members:
        await member.close()


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def refuse(gate: FlexGate) -> None:
    """A flex 429 on the open path of `gate`: what makes a gate busy."""
    flex_pass = gate.try_pass()
    assert flex_pass is not None
    flex_pass.record(Result.BUSY, time.monotonic(), None, 1.0, 0.001)
    flex_pass.done()


async def test_a_busy_spell_seen_by_one_process_is_pushed_to_the_others(fleet: Callable[..., Any]) -> None:
    a, b, c = await fleet(), await fleet(), await fleet()
    b.gate(), c.gate()
    await asyncio.sleep(0.3)  # subscribed
    started = time.monotonic()
    refuse(a.gate())
    assert await eventually(lambda: b.gate().core.state is State.BUSY and c.gate().core.state is State.BUSY)
    assert time.monotonic() - started < 0.5  # a push, not a poll (typically a millisecond or two here)
    assert b.gate().try_pass() is None and c.gate().try_pass() is None  # their next request waits


async def test_a_process_that_never_saw_the_family_gets_its_gate_busy(fleet: Callable[..., Any]) -> None:
    a, b = await fleet(), await fleet()
    await asyncio.sleep(0.3)
    refuse(a.gate())
    assert await eventually(lambda: any(g.key == "o3" and g.core.state is State.BUSY for g in b.gates))


async def test_at_most_one_probe_in_flight_across_the_fleet(fleet: Callable[..., Any]) -> None:
    """Three processes with waiters of their own while flex stays busy: their probes take turns under the lease,
    never two at once, and every process's backoff follows the fleet's."""
    members = [await fleet(), await fleet(), await fleet()]
    await asyncio.sleep(0.3)
    refuse(members[0].gate())
    assert await eventually(lambda: all(m.gate().core.state is State.BUSY for m in members))
    out = 0
    most = 0
    probes: list[int] = []

    async def waiter(index: int) -> None:
        nonlocal out, most
        gate = members[index].gate()
        arrived = time.monotonic()
        while len(probes) < 15:
            flex_pass = await gate.wait(time.monotonic() + 10, arrived)
            assert flex_pass is not None and flex_pass.probe
            out += 1
            most = max(most, out)
            probes.append(index)
            await asyncio.sleep(0.04)  # the probe is on its way to a busy flex pool
            out -= 1
            flex_pass.record(Result.BUSY, time.monotonic(), None, 1.0, 0.04)
            flex_pass.done()

    tasks = [asyncio.create_task(waiter(i)) for i in range(3) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert len(probes) >= 15 and most == 1
    assert len(set(probes)) > 1  # the lease moved between processes


async def test_a_probe_that_gets_through_opens_every_process_and_each_releases_its_own(
    fleet: Callable[..., Any],
) -> None:
    a, b = await fleet(), await fleet()
    await asyncio.sleep(0.3)
    refuse(a.gate())
    assert await eventually(lambda: b.gate().core.state is State.BUSY)
    waiting = [asyncio.create_task(b.gate().wait(time.monotonic() + 10)) for _ in range(5)]
    probe = await asyncio.wait_for(a.gate().wait(time.monotonic() + 10), 5)
    assert probe is not None and probe.probe  # a got the lease (b may not probe meanwhile)
    probe.record(Result.OK, time.monotonic(), None, 1.0, 0.3)
    probe.done()
    passes = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert all(p is not None and not p.probe for p in passes)  # released in b's own ramp, none as a probe
    assert b.gate().core.state is State.OPEN
    for flex_pass in passes:
        assert flex_pass is not None
        flex_pass.done()


async def test_a_lease_left_by_a_dead_process_lapses(fleet: Callable[..., Any], redis_server: RedisServer) -> None:
    """A process died mid-probe holding the lease: nobody probes until it lapses, then someone does."""
    a = await fleet()
    await asyncio.sleep(0.3)
    refuse(a.gate())
    await a.shared.call(lambda r: r.set(a.shared.key("gate:o3", "lease"), "dead", px=600))
    started = time.monotonic()
    probe = await asyncio.wait_for(a.gate().wait(started + 10), 5)
    assert probe is not None and probe.probe
    assert time.monotonic() - started >= 0.55
    probe.done()


async def test_a_missed_open_is_found_by_reading_the_state_while_busy(fleet: Callable[..., Any]) -> None:
    a = await fleet()
    await asyncio.sleep(0.3)
    refuse(a.gate())
    # Another process opened the gate while this one's message was lost: only the state says so.
    await asyncio.sleep(0.2)
    await a.shared.call(lambda r: r.hset(a.shared.key("gate:o3", "state"), mapping={"state": "open", "failed": 0}))
    assert await eventually(lambda: a.gate().core.state is State.OPEN, timeout=5)


async def test_a_process_that_starts_mid_spell_reads_it(fleet: Callable[..., Any]) -> None:
    a = await fleet()
    await asyncio.sleep(0.3)
    refuse(a.gate())
    await asyncio.sleep(0.2)
    late = await fleet()  # its first (re)connect reads every gate's state
    assert await eventually(lambda: any(g.key == "o3" and g.core.state is State.BUSY for g in late.gates))


async def test_with_redis_away_each_process_probes_on_its_own_and_rejoins(
    fleet: Callable[..., Any], redis_server: RedisServer
) -> None:
    a, b = await fleet(), await fleet()
    await asyncio.sleep(0.3)
    redis_server.stop()
    assert await eventually(lambda: not a.shared.up, timeout=5)
    refuse(a.gate())
    probe = await asyncio.wait_for(a.gate().wait(time.monotonic() + 5), 5)  # no lease to take: it goes anyway
    assert probe is not None and probe.probe
    probe.record(Result.OK, time.monotonic(), None, 1.0, 0.1)
    probe.done()
    assert b.gate().core.state is State.OPEN  # b heard nothing: local mode
    redis_server.start()
    assert await eventually(lambda: a.shared.up and b.shared.up, timeout=10)
    refuse(a.gate())
    assert await eventually(lambda: b.gate().core.state is State.BUSY)  # shared again


# -- end to end: two real flex-proxy processes, one Redis, the simulator --------------------------------------


def test_two_proxies_share_one_gate(
    replicas: Callable[..., Replica], redis_server: RedisServer, sim: Simulator  # noqa: F811
) -> None:
    """A busy spell seen by one proxy is honoured by the other: its requests wait in the gate instead of each
    discovering the busy pool, and the fleet sends one probe at a time (counted at the upstream, where every
    refused probe takes 0.15 s: two at once would overlap)."""
    env = {"FLEX_PROXY_GATE_PROBE_INITIAL_S": "0.1", "FLEX_PROXY_GATE_PROBE_MAX_S": "0.2"}
    one = replicas(redis_server.url(), "one", **env)
    two = replicas(redis_server.url(), "two", **env)
    assert until(lambda: one.metrics().total("flexproxy_shared_state_up") == 1)
    sim.script(*[Reply("flex_429", delay_s=0.15)] * 8)

    async def traffic() -> list[str]:
        first = asyncio.create_task(_ask(one))
        await asyncio.sleep(0.5)  # one's first request has found flex busy, and said so
        rest = [asyncio.create_task(_ask(replica)) for replica in (one, two, two, one, two, two)]
        return [await first, *[await task for task in rest]]

    tiers = asyncio.run(traffic())
    assert tiers == ["flex"] * 7
    starts = sorted(r.received_at for r in sim.requests)
    refused = starts[:8]
    assert all(later - earlier >= 0.15 - 0.01 for earlier, later in itertools.pairwise(refused))
    assert len(sim.requests) <= 8 + 7  # the 8 refusals, then one answered attempt per request
    assert two.metrics().total("flexproxy_gate_transitions_total", to="busy") >= 1


async def _ask(replica: Replica) -> str:
    client = replica.client("sk-any")
    try:
        answer = await client.chat.completions.create(model="o3", messages=[{"role": "user", "content": "hi"}])
        return str(answer.service_tier)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"e": "busy"}',
        b'{"k": "", "e": "busy"}',
        b'{"k": 3, "e": "busy"}',
        b'{"k": "o3", "e": "busy", "f": "many"}',
        b'{"k": "o3", "e": "who-knows"}',
    ],
)
async def test_a_message_that_makes_no_sense_changes_nothing(fleet: Callable[..., Any], data: bytes) -> None:
    member = await fleet()
    gate = member.gate()
    member.fleet._message(data)
    assert gate.core.state is State.OPEN and [g.key for g in member.gates] == ["o3"]


async def test_a_busy_message_with_an_unreadable_delay_still_makes_the_gate_busy(fleet: Callable[..., Any]) -> None:
    member = await fleet()
    member.fleet._message(b'{"k": "o3", "e": "busy", "in": "soon", "o": "x"}')
    assert member.gate().core.state is State.BUSY


async def test_hostile_figures_in_a_message_are_clamped_and_long_messages_ignored(fleet: Callable[..., Any]) -> None:
    member = await fleet()
    gate = member.gate()
    member.fleet._message(b'{"k": "o3", "e": "probe", "in": 1e308, "f": 1e300, "o": "x"}'.ljust(4097))
    assert gate.core.state is State.OPEN  # past MAX_MESSAGE (4096 bytes): ignored
    member.fleet._message(b'{"k": "o3", "e": "probe", "in": "nan", "f": -5, "o": "x"}'.ljust(4096))
    assert gate.core.state is State.BUSY and gate.core.failed_probes == 0  # at the bound: read, figures clamped
    member.fleet._message(b'{"k": "o3", "e": "probe", "in": 1e308, "f": 1e18, "o": "x"}')
    assert gate.core.next_probe_at - time.monotonic() <= 60.0  # retry-after's cap
    assert gate.core.failed_probes == 1 << 30
