"""proxy.shared against a real Redis: bounded calls, local mode said once, rejoining, pub/sub, leases, keys."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis as redis_sync
from redis_server import RedisServer

from proxy.config import where
from proxy.shared import SharedDown, SharedState, error_kind

FAST = {"retry_initial_s": 0.05, "retry_max_s": 0.2, "health_interval_s": 0.1}


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture
async def state(redis_server: RedisServer) -> AsyncIterator[SharedState]:
    shared = SharedState(redis_server.url(), **FAST)  # type: ignore[arg-type]
    await shared.start()
    yield shared
    await shared.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache.example:6380/4", "redis://cache.example:6380/4"),
        ("rediss://user:s3cret@cache.example/2", "rediss://cache.example:6379/2"),
        ("redis://localhost", "redis://localhost:6379/0"),
        ("redis://:s3cret@[::1]:7000/1", "redis://[::1]:7000/1"),
        ("unix:///run/redis.sock?db=1", "unix:/run/redis.sock"),
    ],
)
def test_where_never_shows_the_password(url: str, shown: str) -> None:
    assert where(url) == shown
    assert "s3cret" not in where(url)


def test_keys_share_a_hash_tag_per_tag() -> None:
    shared = SharedState("redis://127.0.0.1:1/0", prefix="fp:")
    assert shared.key("spend:2026-10-12:team", "spent") == "fp:{spend:2026-10-12:team}:spent"
    assert shared.key("ledger:2026-10-12") == "fp:{ledger:2026-10-12}"
    assert shared.channel("gate") == "fp:gate"


async def test_calls_go_through_while_up(state: SharedState, redis_server: RedisServer) -> None:
    assert state.up and state.health.mode == "shared" and state.health.where == f"redis://127.0.0.1:{redis_server.port}/0"
    await state.call(lambda r: r.set(state.key("t", "k"), b"v"))
    assert redis_sync.Redis.from_url(redis_server.url()).get("flexproxy:{t}:k") == b"v"


async def test_an_unreachable_redis_at_start_means_local_mode_then_rejoins(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    redis_server.stop()
    seen: list[bool] = []
    shared = SharedState(redis_server.url(), on_health=seen.append, **FAST)  # type: ignore[arg-type]
    caught_up: list[bool] = []

    async def catch_up() -> None:
        caught_up.append(True)

    shared.on_up(catch_up)
    caplog.set_level(logging.INFO, "flex_proxy")
    started = time.monotonic()
    await shared.start()
    try:
        assert time.monotonic() - started < 1.0  # start-up waits one timeout at most
        assert not shared.up and shared.health.mode == "local" and shared.health.last_error == "unreachable"
        assert len(lines(caplog, "unreachable at start")) == 1
        with pytest.raises(SharedDown):
            await shared.call(lambda r: r.ping())
        await asyncio.sleep(0.5)  # reconnect attempts fail quietly: no more lines
        assert len(lines(caplog, "shared state")) == 1
        redis_server.start()
        assert await eventually(lambda: shared.up)
        assert seen == [True] and caught_up == [True]
        assert len(lines(caplog, "answers again")) == 1
    finally:
        await shared.close()


async def test_redis_killed_means_local_mode_said_once_and_back_when_it_returns(
    state: SharedState, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "flex_proxy")
    redis_server.stop()
    for _ in range(20):
        with pytest.raises(SharedDown):
            await state.call(lambda r: r.ping())
    assert not state.up and state.health.mode == "local"
    assert len(lines(caplog, "serving in local mode")) == 1
    redis_server.start()
    assert await eventually(lambda: state.up)
    assert state.health.mode == "shared" and state.health.last_error == "unreachable"
    assert await state.call(lambda r: r.ping())


async def test_an_idle_process_notices_redis_going_away(state: SharedState, redis_server: RedisServer) -> None:
    redis_server.stop()
    assert await eventually(lambda: not state.up)  # no call made: the health PING found it


async def test_a_slow_redis_counts_as_down_within_the_timeout(state: SharedState, redis_server: RedisServer) -> None:
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(SharedDown):
            await state.call(lambda r: r.ping())
        assert time.monotonic() - started < state.timeout_s + 0.2
        assert state.health.last_error == "timeout"
    finally:
        redis_server.resume()
    assert await eventually(lambda: state.up)


async def test_a_wrong_password_means_local_mode_with_one_clear_line(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("redis"), password="right-one").start()
    caplog.set_level(logging.INFO, "flex_proxy")
    try:
        shared = SharedState(server.url(password="wrong-one"), **FAST)  # type: ignore[arg-type]
        await shared.start()
        await asyncio.sleep(0.4)  # several reconnect attempts, all refused
        assert not shared.up and shared.health.last_error == "auth"
        said = lines(caplog, "shared state")
        assert len(said) == 1 and "refused the password" in said[0] and "local mode" in said[0]
        assert not any("wrong-one" in r.getMessage() or "right-one" in r.getMessage() for r in caplog.records)
        await shared.close()
        right = SharedState(server.url(), **FAST)  # type: ignore[arg-type]
        await right.start()
        assert right.up
        await right.close()
    finally:
        server.stop()


async def test_connections_are_bounded(redis_server: RedisServer) -> None:
    shared = SharedState(redis_server.url(), max_connections=2, timeout_s=5.0, **FAST)  # type: ignore[arg-type]
    await shared.start()
    try:
        # 10 calls at once, each holding a connection ~0.1 s (a blocking pop that times out): they queue for the 2
        # connections, and none fails.
        replies = await asyncio.gather(*(shared.call(lambda r: r.blpop(["nothing"], timeout=0.02)) for _ in range(10)))
        assert replies == [None] * 10
        clients = redis_sync.Redis.from_url(redis_server.url()).client_list()
        assert sum(1 for c in clients if c["name"] == "flex-proxy") <= 2
    finally:
        await shared.close()


def subscribers(server: RedisServer, channel: str) -> int:
    return int(redis_sync.Redis.from_url(server.url()).pubsub_numsub(channel)[0][1])


async def test_a_message_reaches_every_subscriber_also_after_redis_returns(redis_server: RedisServer) -> None:
    one, two = (SharedState(redis_server.url(), **FAST) for _ in range(2))  # type: ignore[arg-type]
    got: list[bytes] = []
    two.subscribe("gate", got.append)
    await one.start()
    await two.start()
    try:
        assert await eventually(lambda: subscribers(redis_server, "flexproxy:gate") == 1)
        assert await one.publish("gate", b"o3 busy")
        assert await eventually(lambda: got == [b"o3 busy"])
        redis_server.stop()
        assert not await one.publish("gate", b"lost")
        redis_server.start()
        assert await eventually(lambda: one.up and two.up)
        assert await eventually(lambda: subscribers(redis_server, "flexproxy:gate") == 1)
        assert await one.publish("gate", b"o3 open")
        assert await eventually(lambda: got == [b"o3 busy", b"o3 open"])
    finally:
        await one.close()
        await two.close()


async def test_a_lease_is_held_by_one_owner_and_lapses(state: SharedState) -> None:
    assert await state.acquire("gate:o3", "a", ttl_s=0.3)
    assert not await state.acquire("gate:o3", "b", ttl_s=0.3)
    assert not await state.release("gate:o3", "b")  # only its owner frees it
    assert await state.renew("gate:o3", "a", ttl_s=0.3)
    assert not await state.renew("gate:o3", "b", ttl_s=0.3)
    await asyncio.sleep(0.45)  # a's process died mid-probe: the lease lapses by itself
    assert await state.acquire("gate:o3", "b", ttl_s=5)
    assert await state.release("gate:o3", "b")
    assert await state.acquire("gate:o3", "a", ttl_s=5)


def test_error_kinds() -> None:
    from redis.exceptions import AuthenticationError, ConnectionError, ReadOnlyError, ResponseError

    assert error_kind(AuthenticationError("x")) == "auth"
    assert error_kind(ResponseError("NOAUTH Authentication required.")) == "auth"
    assert error_kind(ConnectionError("x")) == "unreachable"
    assert error_kind(TimeoutError()) == "timeout"
    assert error_kind(ReadOnlyError("x")) == "refused"
    assert error_kind(ResponseError("WRONGTYPE")) == "error"


async def test_a_cancelled_call_stops_and_leaves_redis_up(state: SharedState) -> None:
    """A client that leaves cancels its request's task: the call must end with it (some redis-py releases lost the
    cancel and went on), and Redis must not be taken for down."""
    for delay in (0.0, 0.001, 0.002, 0.005):

        async def many_calls() -> None:
            for _ in range(2_000):
                await state.call(lambda r: r.ping())

        task = asyncio.get_running_loop().create_task(many_calls())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    assert state.up
