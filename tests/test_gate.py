"""proxy.gate: the state machine as tables, its asyncio face with real tasks, and the gate end to end."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import ProxyServer

from proxy.gate import MAX_GATES, FlexGate, GateConfig, Gates, GateState, Reporter, Result, State, Waiter
from proxy.metrics import Metrics
from proxy.reporting import GateMetrics
from proxy.sim import Reply, Simulator

CONFIG = GateConfig(probe_initial_s=0.25, probe_max_s=1.0, probe_min_s=0.1, ramp_step_s=0.05, max_waiting=3)
MESSAGES = [{"role": "user", "content": "hi"}]


def busy_gate(now: float = 0.0, rand: float = 1.0, retry_after: float | None = None) -> GateState:
    gate = GateState(CONFIG)
    gate.record(Result.BUSY, None, now=now, retry_after=retry_after, rand=rand)
    return gate


# -- the state machine ---------------------------------------------------------------------------------------


def test_open_gate_admits_at_once_and_a_429_makes_it_busy() -> None:
    gate = GateState(CONFIG)
    assert gate.admit()
    gate.record(Result.BUSY, None, now=10.0, retry_after=None, rand=1.0)
    assert gate.state is State.BUSY and not gate.admit()
    assert gate.next_probe_at == pytest.approx(10.25)  # first probe cap 0.25 s, equal jitter at rand=1
    assert gate.transitions == [State.BUSY]


@pytest.mark.parametrize(
    ("failed", "rand", "retry_after", "delay"),
    [
        (0, 1.0, None, 0.25),
        (0, 0.0, None, 0.125),  # equal jitter: never less than half the cap
        (1, 1.0, None, 0.25),
        (2, 1.0, None, 0.5),
        (3, 1.0, None, 1.0),
        (6, 1.0, None, 1.0),  # capped
        (6, 0.0, None, 0.5),
        (0, 1.0, 3.0, 3.0),  # upstream's retry-after is a floor
        (0, 1.0, 500.0, 60.0),  # ... capped
    ],
)
def test_probe_schedule(failed: int, rand: float, retry_after: float | None, delay: float) -> None:
    gate = GateState(CONFIG, state=State.BUSY, failed_probes=failed)
    gate._schedule_probe(0.0, retry_after, rand)
    assert gate.next_probe_at == pytest.approx(delay)


def test_in_a_fleet_a_due_probe_waits_for_the_lease_and_a_lease_is_good_for_one() -> None:
    gate = busy_gate()
    gate.needs_lease = True
    a, b = Waiter(arrived=1.0), Waiter(arrived=2.0)
    gate.enqueue(a)
    gate.enqueue(b)
    assert gate.due(0.1) == ([], pytest.approx(0.25))  # not due yet: no lease asked for
    assert gate.due(1.0) == ([], None) and gate.lease_wanted  # due: the caller asks the fleet
    gate.lease_wanted, gate.leased_until = False, 2.0
    assert gate.due(1.0)[0] == [a] and gate.leased_until == 0.0
    gate.record(Result.BUSY, a, now=1.1, retry_after=None, rand=1.0)
    assert gate.due(5.0) == ([], None) and gate.lease_wanted  # the next probe needs the lease again


def test_a_probe_refused_elsewhere_makes_the_gate_busy_and_holds_its_probes_back() -> None:
    gate = GateState(CONFIG)
    gate.probe_refused_elsewhere(10.0, 0.8, 3)
    assert gate.state is State.BUSY and gate.failed_probes == 3 and gate.next_probe_at == pytest.approx(10.8)
    gate.probe_refused_elsewhere(10.5, float("nan"), 10**12)  # hostile figures from another process
    assert gate.failed_probes == 1 << 30 and gate.next_probe_at == pytest.approx(70.5)  # retry-after's cap


@pytest.mark.parametrize("failed", [1_024, 1_025, 1_026, 5_000, 10**9])
def test_a_busy_spell_of_any_length_keeps_a_finite_probe_schedule(failed: int) -> None:
    """2.0 ** (failed - 1) overflows past 1,024 failed probes: the interval stops doubling long before."""
    gate = GateState(CONFIG, state=State.BUSY, failed_probes=failed)
    gate._schedule_probe(100.0, None, 1.0)
    assert gate.next_probe_at == pytest.approx(101.0)  # the cap


def test_an_hour_long_outage_keeps_probing_at_the_cap() -> None:
    """Flex refuses every probe for an hour at 2 probes a second: the gate keeps its pace and stays busy."""
    gate = busy_gate()
    now = 0.0
    for probes in range(1, 7_201):
        gate.enqueue(Waiter(arrived=now))
        released, _ = gate.due(gate.next_probe_at)
        now = gate.next_probe_at
        assert released and gate.verdict is released[0]
        gate.record(Result.BUSY, released[0], now=now, retry_after=None, rand=0.0)
        if probes > 3:
            assert gate.next_probe_at - now == pytest.approx(0.5)  # half the 1 s cap, at rand 0
    assert gate.failed_probes == 7_200 and gate.state is State.BUSY


@pytest.mark.parametrize("rand", [float("nan"), float("inf"), -1.0, 2.0])
def test_a_hostile_random_draw_cannot_break_the_schedule(rand: float) -> None:
    gate = GateState(CONFIG, state=State.BUSY)
    gate._schedule_probe(0.0, float("nan"), rand)
    assert 0.1 <= gate.next_probe_at <= 60.0


def test_probes_wait_for_a_share_of_the_shortest_recent_busy_spell() -> None:
    """Once busy spells have been seen, the first probe of the next one waits for half the shortest: flex tends
    to stay away about as long as it did, and a probe sooner is a wasted attempt."""
    gate = GateState(GateConfig(probe_initial_s=0.25, probe_max_s=0.5, spell_share=0.5, max_waiting=10))
    gate.record(Result.BUSY, None, now=0.0, retry_after=None, rand=1.0)
    assert gate.next_probe_at == pytest.approx(0.25)  # nothing learned yet
    probe = Waiter()
    gate.enqueue(probe)
    gate.due(3.0)  # sent at 3.0: the spell lasted 3 s
    gate.record(Result.OK, probe, now=3.5, retry_after=None, rand=1.0)
    assert list(gate.spells) == [pytest.approx(3.0)]
    gate.record(Result.BUSY, None, now=10.0, retry_after=None, rand=1.0)
    assert gate.next_probe_at == pytest.approx(11.5)  # half of 3 s after the spell began
    gate.enqueue(probe := Waiter())
    gate.due(11.5)
    gate.record(Result.BUSY, probe, now=11.5, retry_after=None, rand=1.0)
    assert gate.next_probe_at == pytest.approx(11.75)  # past the head start, the usual doubling


def test_the_shortest_spell_rules_and_old_spells_are_forgotten() -> None:
    gate = GateState(GateConfig(spell_share=0.5, spells_kept=3))
    for length in (8.0, 2.0, 6.0, 6.0, 6.0):
        gate.refused(0.0, None, 1.0)
        gate.opened(length, spell_end=length)
    assert list(gate.spells) == [6.0, 6.0, 6.0]  # the 2 s spell is forgotten
    gate.refused(100.0, None, 1.0)
    assert gate.next_probe_at == pytest.approx(103.0)


def test_the_probe_is_the_waiter_that_waited_longest_and_keeps_its_place_when_refused() -> None:
    gate = busy_gate()
    first, second, third = Waiter(arrived=1.0), Waiter(arrived=2.0), Waiter(arrived=3.0)
    for waiter in (third, first, second):  # queued in any order: kept in arrival order
        gate.enqueue(waiter)
    released, _ = gate.due(1.0)
    assert released == [first] and gate.verdict is first
    gate.record(Result.BUSY, first, now=1.0, retry_after=None, rand=1.0)
    again = Waiter(arrived=1.0)  # the refused probe's request waits again, with its arrival time
    gate.enqueue(again)
    assert gate.queue == [again, second, third]


def test_a_probe_not_refused_in_time_opens_the_gate_and_its_own_answer_counts_as_anyone_s() -> None:
    gate = GateState(GateConfig(accept_after_s=0.5, max_waiting=10))
    gate.record(Result.BUSY, None, now=0.0, retry_after=None, rand=1.0, latency=0.3)
    assert gate.accept_after() == pytest.approx(0.9)  # three times the slowest refusal seen, above the floor
    probe, other = Waiter(), Waiter()
    gate.enqueue(probe)
    gate.enqueue(other)
    assert gate.due(1.0)[0] == [probe]
    assert gate.accept(probe, 1.9)
    assert gate.state is State.OPEN and gate.verdict is None
    assert gate.due(1.9)[0] == [other]  # the ramp starts without waiting for the probe's (slow) answer
    gate.record(Result.BUSY, probe, now=2.5, retry_after=None, rand=1.0)  # refused after all
    assert gate.state is State.BUSY
    assert not gate.accept(other, 3.0)  # only the current probe can be accepted


def test_one_probe_at_a_time_and_only_when_due() -> None:
    gate = busy_gate()
    a, b = Waiter(), Waiter()
    assert gate.enqueue(a) and gate.enqueue(b)
    assert gate.due(0.1) == ([], pytest.approx(0.25))  # not yet
    released, wake = gate.due(0.25)
    assert released == [a] and a.probe and wake is None
    assert gate.due(5.0) == ([], None)  # the probe is out: nobody else goes
    assert list(gate.queue) == [b]


def test_a_failed_probe_keeps_the_gate_busy_and_backs_off() -> None:
    gate = busy_gate()
    a = Waiter()
    gate.enqueue(a)
    gate.due(0.3)
    gate.record(Result.BUSY, a, now=0.3, retry_after=None, rand=1.0)
    assert gate.state is State.BUSY and gate.verdict is None
    assert gate.next_probe_at == pytest.approx(0.3 + 0.25)  # first failed probe: cap 0.25
    gate.enqueue(a)
    gate.due(0.6)
    gate.record(Result.BUSY, a, now=1.0, retry_after=None, rand=1.0)
    assert gate.next_probe_at == pytest.approx(1.0 + 0.5)


def test_a_probe_that_errs_says_nothing_of_capacity() -> None:
    gate = busy_gate()
    probe = Waiter()
    gate.enqueue(probe)
    gate.due(0.3)
    gate.record(Result.ERROR, probe, now=0.3, retry_after=None, rand=1.0)
    assert gate.state is State.BUSY and gate.verdict is None
    assert gate.next_probe_at == pytest.approx(0.4)  # the minimum gap, then another probe


def test_a_successful_probe_opens_the_gate_and_releases_waiters_in_a_ramp() -> None:
    gate = GateState(GateConfig(max_waiting=100, ramp_step_s=0.05))
    gate.record(Result.BUSY, None, now=0.0, retry_after=None, rand=1.0)
    waiters = [Waiter() for _ in range(20)]
    for waiter in waiters:
        gate.enqueue(waiter)
    probe = gate.due(1.0)[0][0]  # the probe goes
    gate.record(Result.OK, probe, now=1.1, retry_after=None, rand=1.0)
    assert gate.state is State.OPEN and gate.transitions == [State.BUSY, State.OPEN]
    batches = []
    now = 1.1
    for _ in range(10):
        released, wake = gate.due(now)
        batches.append(len(released))
        if wake is None:
            break
        assert wake == pytest.approx(now + 0.05)
        now = wake
    assert batches == [1, 2, 4, 8, 4]  # 19 waiters left after the probe: 1, 2, 4, 8, then the rest
    assert not gate.admit() or not gate.queue  # new arrivals queue behind waiters while the ramp runs
    assert gate.admit()


def test_new_arrivals_queue_behind_a_ramp() -> None:
    gate = GateState(GateConfig(max_waiting=100))
    gate.state = State.OPEN
    gate.enqueue(Waiter())
    assert not gate.admit()


def test_other_requests_429s_do_not_reschedule_a_busy_gate_except_a_longer_retry_after() -> None:
    gate = busy_gate(now=0.0)
    gate.record(Result.BUSY, None, now=0.1, retry_after=None, rand=1.0)
    assert gate.next_probe_at == pytest.approx(0.25)
    gate.record(Result.BUSY, None, now=0.1, retry_after=2.0, rand=1.0)
    assert gate.next_probe_at == pytest.approx(2.1)


def test_answers_of_requests_sent_before_the_gate_went_busy_do_not_open_it() -> None:
    gate = busy_gate()
    gate.record(Result.OK, None, now=0.1, retry_after=None, rand=1.0)
    assert gate.state is State.BUSY


def test_the_queue_is_bounded() -> None:
    gate = busy_gate()
    assert all(gate.enqueue(Waiter()) for _ in range(3))
    assert not gate.enqueue(Waiter())


def test_a_waiter_that_leaves_frees_its_place_and_the_probe_slot() -> None:
    gate = busy_gate()
    a, b = Waiter(), Waiter()
    gate.enqueue(a)
    gate.enqueue(b)
    gate.due(1.0)
    assert gate.verdict is a
    gate.leave(a)
    assert gate.verdict is None
    gate.leave(b)
    assert not gate.queue


def test_in_flight_cap_queues_the_excess_and_releases_as_places_free() -> None:
    gate = GateState(GateConfig(max_in_flight=2, max_waiting=10))
    assert gate.admit()
    gate.in_flight = 2
    assert not gate.admit()
    waiter = Waiter()
    gate.enqueue(waiter)
    assert gate.due(0.0) == ([], None)
    gate.in_flight = 1
    released, _ = gate.due(0.0)
    assert released == [waiter] and gate.in_flight == 2


# -- the asyncio face, with real tasks ----------------------------------------------------------------------


class Recorder(Reporter):
    def __init__(self) -> None:
        self.moves: list[State] = []
        self.probes: list[Result] = []

    def changed(self, gate: FlexGate, moves: list[State]) -> None:
        self.moves.extend(moves)

    def probed(self, gate: FlexGate, result: Result) -> None:
        self.probes.append(result)


def make_gate(**config: Any) -> tuple[FlexGate, Recorder]:
    values: dict[str, Any] = {"probe_initial_s": 0.02, "probe_max_s": 0.05, "probe_min_s": 0.01, "ramp_step_s": 0.01}
    values.update(config)
    recorder = Recorder()
    return FlexGate("o3", GateConfig(**values), time.monotonic, recorder), recorder


async def test_waiters_are_released_after_a_successful_probe() -> None:
    gate, recorder = make_gate()
    first = gate.try_pass()
    assert first is not None
    first.record(Result.BUSY, time.monotonic(), None, 1.0, 0.001)
    first.done()
    assert gate.try_pass() is None  # busy: the open path says wait

    async def one(i: int) -> bool:
        flex_pass = await gate.wait(time.monotonic() + 5)
        assert flex_pass is not None
        flex_pass.record(Result.OK, time.monotonic(), None, 0.5, 0.01)
        flex_pass.done()
        return flex_pass.probe

    probes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(30))), 5)
    assert sum(probes) == 1  # exactly one request went as the probe, and it was answered
    assert recorder.moves == [State.BUSY, State.OPEN] and recorder.probes == [Result.OK]
    assert gate.try_pass() is not None


async def test_a_waiter_whose_deadline_passes_gets_none_and_leaves() -> None:
    gate, _ = make_gate(probe_initial_s=10, probe_max_s=10)
    first = gate.try_pass()
    assert first is not None
    first.record(Result.BUSY, time.monotonic(), None, 1.0, 0.001)
    first.done()
    started = time.monotonic()
    assert await gate.wait(started + 0.05) is None
    assert time.monotonic() - started < 2
    assert not gate.core.queue


async def test_a_waiter_that_is_cancelled_frees_its_place() -> None:
    gate, _ = make_gate(probe_initial_s=10, probe_max_s=10)
    first = gate.try_pass()
    assert first is not None
    first.record(Result.BUSY, time.monotonic(), None, 1.0, 0.001)
    task = asyncio.create_task(gate.wait(time.monotonic() + 30))
    for _ in range(100):
        if gate.core.queue:
            break
        await asyncio.sleep(0.01)
    assert len(gate.core.queue) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not gate.core.queue


async def test_a_probe_whose_client_leaves_lets_another_probe_go() -> None:
    gate, _ = make_gate()
    first = gate.try_pass()
    assert first is not None
    first.record(Result.BUSY, time.monotonic(), None, 1.0, 0.001)
    first.done()
    probe = await asyncio.wait_for(gate.wait(time.monotonic() + 5), 5)
    assert probe is not None and probe.probe
    second = asyncio.create_task(gate.wait(time.monotonic() + 5))
    probe.done()  # ended without a verdict
    other = await asyncio.wait_for(second, 5)
    assert other is not None and other.probe


async def test_a_probe_that_ends_after_the_gate_moved_on_releases_nobody() -> None:
    """A streamed probe opens the gate when its stream starts; while it is still being relayed the gate goes busy
    again and sends a second probe. When the first stream ends, that must not count as the second probe's verdict
    and let a third request through while the second is still out."""
    gate, _ = make_gate(accept_after_s=5, probe_initial_s=0.01, probe_max_s=0.01)
    first = gate.try_pass()
    assert first is not None
    first.record(Result.BUSY, time.monotonic(), None, 1.0, 0.001)
    first.done()
    streamed = await asyncio.wait_for(gate.wait(time.monotonic() + 5), 5)
    assert streamed is not None and streamed.probe
    streamed.record(Result.OK, time.monotonic(), None, 1.0, 0.01)  # its stream opened: flex is back
    assert gate.core.state is State.OPEN
    other = gate.try_pass()
    assert other is not None
    other.record(Result.BUSY, time.monotonic(), None, 1.0, 0.001)  # busy again
    other.done()
    second = await asyncio.wait_for(gate.wait(time.monotonic() + 5), 5)
    assert second is not None and second.probe and gate.core.verdict is not None
    third = asyncio.create_task(gate.wait(time.monotonic() + 0.3))
    await asyncio.sleep(0.02)
    streamed.done()  # the first stream ends
    assert await third is None  # nobody was let through while the second probe's verdict is awaited
    assert gate.core.state is State.BUSY and gate.core.in_flight == 1  # only the second probe is out


async def test_a_client_that_leaves_as_it_is_let_through_never_goes() -> None:
    """Release and cancel in the same turn of the loop (the client left just as the probe was let go): the
    request must see its cancel, not a pass (asyncio.wait_for on Python 3.11 can swallow it)."""
    for _ in range(50):
        gate, _ = make_gate(probe_initial_s=60, probe_max_s=60)
        first = gate.try_pass()
        assert first is not None
        first.record(Result.BUSY, time.monotonic(), None, 1.0, 0.001)
        first.done()
        task = asyncio.create_task(gate.wait(time.monotonic() + 30))
        await asyncio.sleep(0)
        assert len(gate.core.queue) == 1
        gate.core.next_probe_at = 0.0
        gate._pump()  # the probe is released: its future has a result
        task.cancel()  # ... and the client leaves before the task runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.core.in_flight == 0 and gate.core.verdict is None


async def test_gates_are_bounded_per_family_when_scoped_by_key() -> None:
    gates = Gates(GateConfig(), time.monotonic)
    for i in range(MAX_GATES + 50):
        gates.get(f"o3@{i:08x}")
    keys = {gate.key for gate in gates}
    assert len(keys) == MAX_GATES + 1 and "o3@other" in keys
    assert gates.get("o3@ffffffff").key == "o3@other"


async def test_a_gate_transition_log_line_escapes_its_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="flex_proxy.gate")
    gate = FlexGate("o3\nflex gate gpt-5 is open", GateConfig(), time.monotonic, GateMetrics(Metrics(process=False)))
    first = gate.try_pass()
    assert first is not None
    first.record(Result.BUSY, time.monotonic(), None, 1.0, 0.001)
    first.done()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "flex_proxy.gate"]
    assert "\n" not in line and line.startswith('flex gate "o3\\nflex gate gpt-5 is open" is busy')


# -- end to end: the official SDK, the proxy and the simulator on loopback -----------------------------------


def test_a_busy_burst_is_absorbed_by_the_gate(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    """Flex refuses everything for a moment: concurrent requests wait in the gate instead of each hammering flex,
    then all land on flex once a probe gets through."""
    proxy = make_proxy(gate_probe_initial_s=0.05, gate_probe_max_s=0.1)
    sim.script(*[Reply(kind="flex_429")] * 3)
    results: list[str | None] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            answer = proxy.client().chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
            results.append(answer.service_tier)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and results == ["flex"] * 12
    # Every request was answered on flex, with far fewer 429s than one per request and retry.
    assert len(sim.requests) <= 12 + 3
    assert proxy.metric("flexproxy_gate_transitions_total", to="busy") >= 1
    assert proxy.metric("flexproxy_gate_transitions_total", to="open") >= 1
    assert proxy.metric("flexproxy_fallbacks_total") == 0


def test_backoff_waits_in_the_gate_then_gets_a_429_with_retry_after(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    proxy = make_proxy(on_unavailable="backoff", flex_budget_s=0.5, gate_probe_initial_s=5, gate_probe_max_s=5)
    sim.script(*[Reply(kind="flex_429")] * 5)
    with pytest.raises(openai.RateLimitError) as caught:
        proxy.client().chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert len(sim.requests) == 1  # it waited in the gate for its budget: no probe was due


def test_standard_strategy_does_not_wait_for_a_busy_gate(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    proxy = make_proxy(gate_probe_initial_s=30, gate_probe_max_s=30)
    sim.script(Reply(kind="flex_429"))
    standard = proxy.client(default_headers={"X-Flex-On-Unavailable": "standard"})
    for _ in range(2):
        answer = standard.chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
        assert answer.service_tier == "default"
    assert [r.tier for r in sim.requests] == ["flex", "auto", "auto"]  # the gate was busy: no second flex attempt


def test_rate_limits_do_not_move_the_gate(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    proxy = make_proxy()
    sim.script(Reply(kind="rate_limit_429", retry_after_ms=10), Reply(), Reply(kind="quota_429"))
    proxy.client().chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError):
        proxy.client().chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert proxy.metric("flexproxy_gate_transitions_total") == 0


def test_clients_that_leave_while_waiting_free_their_places(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    proxy = make_proxy(gate_probe_initial_s=60, gate_probe_max_s=60)
    sim.script(Reply(kind="flex_429"))
    body = {"model": "o3", "messages": MESSAGES}
    # Clients that state no deadline and give up after half a second (the SDK would say its timeout, and get a
    # clean 429 before it rather than wait): the first makes the gate busy, then waits in it.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.base_url + "/chat/completions", json=body, headers={"authorization": "Bearer k"}, timeout=0.5)

    def leave() -> None:
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(proxy.base_url + "/chat/completions", json=body, headers={"authorization": "Bearer k"},
                       timeout=0.5)  # fmt: skip

    threads = [threading.Thread(target=leave) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sim.wait_for(lambda: proxy.metric("flexproxy_requests_total", outcome="client_disconnected") == 9, 10)
    assert proxy.metric("flexproxy_gate_waiting", model="o3") == 0  # every place freed
    assert len(sim.requests) == 1  # nobody who left was sent upstream


def test_a_flex_pool_that_never_comes_back_falls_back_before_the_deadline(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    proxy = make_proxy(standard_reserve_s=0.5, gate_probe_initial_s=0.2, gate_probe_max_s=0.2, max_flex_attempts=50)
    sim.options = type(sim.options)(flex_busy_share=1.0)  # flex refuses everything, always
    client = proxy.client(default_headers={"X-Flex-Deadline-S": "3"})
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    took = time.monotonic() - started
    assert raw.parse().service_tier == "default"
    assert 1.5 < took < 3.0  # waited for flex most of its 3 s, leaving the reserve for standard
    backoff = proxy.client(default_headers={"X-Flex-Deadline-S": "2", "X-Flex-On-Unavailable": "backoff"})
    with pytest.raises(openai.RateLimitError) as caught:
        backoff.chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert all(r.tier == "flex" for r in sim.requests[-3:])  # backoff never paid standard


def test_the_standard_reserve_is_learned(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    """Before any standard answer the configured reserve applies; once standard is seen to answer fast, a
    request may wait for flex until much closer to its deadline."""
    proxy = make_proxy(standard_reserve_s=1.5, standard_reserve_min_s=0.2, gate_probe_initial_s=5, gate_probe_max_s=5)
    sim.script(Reply(kind="flex_429"))
    client = proxy.client(default_headers={"X-Flex-Deadline-S": "2"})

    def fallback_after() -> float:
        started = time.monotonic()
        answer = client.chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
        assert answer.service_tier == "default"
        return time.monotonic() - started

    first = fallback_after()  # deadline 1.9 s, reserve 1.5 s: flex until 0.4 s
    for _ in range(8):  # standard answers in milliseconds: the reserve falls to its floor, 0.2 s
        proxy.client(default_headers={"X-Flex-Tier": "off"}).chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    second = fallback_after()  # flex until 1.7 s
    assert first < 1.0 < second < 2.0


def test_a_slow_probe_opens_the_gate_once_it_is_not_refused(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    """A flex answer may take minutes; the waiters should not: once the probe has gone unrefused for a while the
    gate opens, and the others are answered while the probe's own answer is still on its way."""
    proxy = make_proxy(gate_probe_initial_s=0.05, gate_probe_max_s=0.05, gate_accept_s=0.3)
    sim.script(Reply(kind="flex_429"), Reply(delay_s=3.0))  # the first request's 429, then the probe: slow
    finished: list[float] = []
    started = time.monotonic()

    def call() -> None:
        answer = proxy.client().chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
        assert answer.service_tier == "flex"
        finished.append(time.monotonic() - started)

    first = threading.Thread(target=call)
    first.start()
    assert sim.wait_for(lambda: proxy.metric("flexproxy_gate_busy", model="o3") == 1, 5)
    others = [threading.Thread(target=call) for _ in range(5)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(20)
    assert len(finished) == 6
    assert sorted(finished)[4] < 2.5  # five answered long before the slow probe's 3 s
    assert max(finished) >= 3.0  # ...which was answered too, on flex
    assert proxy.metric("flexproxy_gate_probes_total", result="ok") == 1


def test_a_lone_request_waits_for_flex_as_long_as_its_deadline_allows(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    """One client, one request (a batch script's shape): flex refuses for 2.5 s. The request waits in the gate and
    is its own probe every time, far past FLEX_PROXY_MAX_FLEX_ATTEMPTS (probes do not use up its attempts), and
    lands on flex: it had 20 s, and only a random draw or an attempt count would have made it fall back."""
    proxy = make_proxy(gate_probe_initial_s=0.1, gate_probe_max_s=0.2, max_flex_attempts=2)
    sim.options = type(sim.options)(busy_period_s=1000.0, busy_for_s=2.5)
    sim.reset()  # the busy pattern starts now
    started = time.monotonic()
    raw = proxy.client(timeout=20).chat.completions.with_raw_response.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.parse().service_tier == "flex"
    assert time.monotonic() - started >= 2.4
    assert len(sim.requests) > 2 and all(r.tier == "flex" for r in sim.requests)
    assert proxy.metric("flexproxy_fallbacks_total") == 0


def test_a_batch_script_lands_on_flex_through_busy_spells(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    """Requests one after another while flex is refused 0.4 s of every 1.5 s: every one is answered on flex."""
    proxy = make_proxy(gate_probe_initial_s=0.05, gate_probe_max_s=0.1)
    sim.options = type(sim.options)(busy_period_s=1.5, busy_for_s=0.4, latency_flex_s=0.05)
    sim.reset()  # the busy pattern starts now
    client = proxy.client(timeout=60)
    tiers = [client.chat.completions.create(model="o3", messages=MESSAGES).service_tier for _ in range(40)]  # type: ignore[arg-type]
    assert tiers == ["flex"] * 40
    assert proxy.metric("flexproxy_gate_transitions_total", to="busy") >= 1  # it did meet busy spells
    assert proxy.metric("flexproxy_fallbacks_total") == 0


def test_a_deadline_shorter_than_the_standard_reserve_goes_to_standard_at_once(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    """The client will wait 1.5 s and a standard answer is allowed 2 s (the reserve's floor): trying flex first
    could only end in a 429 or in a 504 on work upstream accepted, so the request goes to standard at once."""
    proxy = make_proxy(standard_reserve_s=2.0)
    client = proxy.client(default_headers={"X-Flex-Deadline-S": "1.5"})
    raw = client.chat.completions.with_raw_response.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.parse().service_tier == "default"
    assert raw.headers["x-flex-attempts"] == "1"
    assert [r.tier for r in sim.requests] == ["auto"]
    assert proxy.metric("flexproxy_fallbacks_total") == 1  # sent standard instead of flex: counted as such
    roomy = proxy.client(default_headers={"X-Flex-Deadline-S": "30"})
    assert roomy.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "flex"  # type: ignore[arg-type]


def test_a_reserve_learned_from_streams_does_not_shorten_a_whole_answer(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    """Streamed standard answers start in milliseconds, but a whole answer takes as long as the work: the
    reserves are learned apart, so a non-streamed request still keeps the configured 1.5 s for its fallback."""
    proxy = make_proxy(standard_reserve_s=1.5, standard_reserve_min_s=0.2, gate_probe_initial_s=5, gate_probe_max_s=5)
    off = proxy.client(default_headers={"X-Flex-Tier": "off"})
    for _ in range(8):  # streamed standard answers: the streamed reserve falls to its floor, 0.2 s
        list(off.chat.completions.create(model="o3", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    status = httpx.get(proxy.url + "/flex/status").json()
    assert next(f for f in status["families"] if f["family"] == "o3")["standard_reserve_s"] == 1.5  # whole answers
    sim.options = type(sim.options)(flex_busy_share=1.0)
    client = proxy.client(default_headers={"X-Flex-Deadline-S": "3"})
    started = time.monotonic()
    assert client.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "default"  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.8  # fell back at 2.85 - 1.5 s, not at 2.85 - 0.2 s


def test_made_up_model_names_share_one_gate_and_cannot_crowd_out_a_real_family(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients choose model names: 1,200 made-up ones forced onto flex make one `other` gate, series and
    observation, and gpt-5 is still learned afterwards; no log line carries a client's name raw."""
    caplog.set_level("INFO", logger="flex_proxy.gate")
    proxy = make_proxy()
    sim.options = type(sim.options)(known_models=("*",), flex_models=("*",))
    headers = {"authorization": "Bearer k", "x-flex-tier": "flex"}
    with httpx.Client(base_url=proxy.base_url, headers=headers, timeout=10) as http:
        sim.script(Reply(kind="flex_429"))  # the first junk request makes the `other` gate busy: a log line
        for i in range(1_200):
            body = {"model": f"junk-{i}\nflex gate o3 is open", "messages": MESSAGES}
            assert http.post("/chat/completions", json=body).status_code == 200
        off = {**headers, "x-flex-tier": "off"}
        http.post("/chat/completions", json={"model": "gpt-5", "messages": MESSAGES}, headers=off)
    status = httpx.get(proxy.url + "/flex/status").json()
    families = {f["family"] for f in status["families"]}
    assert families <= {"other", "gpt-5"} and "gpt-5" in families
    gpt5 = next(f for f in status["families"] if f["family"] == "gpt-5")
    assert gpt5["standard_p95_s"] is not None  # learned, after the junk
    assert [g["key"] for f in status["families"] for g in f["gates"]] == ["other"]
    text = proxy.metrics()
    assert "junk" not in text and len(text.splitlines()) < 1_000
    gate_lines = [r.getMessage() for r in caplog.records if r.name == "flex_proxy.gate"]
    assert gate_lines and all("junk" not in line and "\n" not in line for line in gate_lines)


def test_a_responses_stream_claims_no_served_tier_before_it_is_known(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    """A Responses stream's opening events echo the requested tier (`auto`); the tier that served it comes in its
    last event. No header claims a tier before then, and the count uses the last event's."""
    proxy = make_proxy()
    client = proxy.client()
    with client.responses.with_streaming_response.create(model="o3", input="hi", stream=True) as raw:
        assert "x-flex-served-tier" not in raw.headers
        assert raw.headers["x-flex-requested-tier"] == "flex"
        events = [line for line in raw.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "event: response.completed"
    assert sim.wait_for(lambda: proxy.metric("flexproxy_requests_total", served_tier="flex") == 1, 5)
    chat = client.chat.completions.with_raw_response.create(model="o3", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert chat.headers["x-flex-served-tier"] == "flex"  # a chat chunk names its tier: known at once
    list(chat.parse())
