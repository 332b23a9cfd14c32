"""The state a fleet of proxies shares, in Redis (optional): one connection pool, every call bounded by a short
timeout, and the health of it all. Down, slow or refusing the password, it is left alone: each process serves
from its own state ("local mode"), says so once (log, metric, /flex/status) and rejoins when Redis answers again.

What it offers the modules that share state: `call` (a bounded command, or `SharedDown`), `key` (hash-tagged
for Redis Cluster), `on_up` (run after every (re)connect: re-read state, flush what waited), `subscribe` and
`publish` (a push to every process), and leases with an expiry (`acquire`, `renew`, `release`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from .config import where

LOG = logging.getLogger("flex_proxy")
T = TypeVar("T")
Mode = Literal["off", "shared", "local"]
HEALTH_INTERVAL_S = 1.0  # while up, a PING this often, so an idle process notices Redis going away
RETRY_INITIAL_S = 0.25  # while down, reconnect attempts start this far apart and double...
RETRY_MAX_S = 5.0  # ...up to this
MAX_CONNECTIONS = 64  # per process; a call that cannot get one within the timeout counts as Redis being slow
# Compare-and-set on a lease's owner, so only the process that holds a lease renews or frees it.
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class SharedDown(Exception):
    """The shared state did not answer in time (or is in local mode): the caller uses its own state."""


@dataclass(frozen=True)
class Health:
    mode: Mode  # off: not configured; shared: Redis answers; local: it does not, each process on its own
    since: float | None  # wall-clock time the mode began
    last_error: str | None  # unreachable | timeout | auth | refused | error: the kind, never the message
    where: str | None  # host:port/db, never the password


def error_kind(exc: BaseException) -> str:
    """What went wrong, in a word fit for a label, a status field and a log line."""
    if isinstance(exc, AuthenticationError | NoPermissionError):
        return "auth"
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "TimeoutError":  # ours, or redis-py's
        return "timeout"
    if isinstance(exc, ReadOnlyError | OutOfMemoryError | BusyLoadingError):
        return "refused"
    if isinstance(exc, ResponseError):
        text = str(exc)
        return "auth" if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")) else "error"
    if isinstance(exc, RedisError | OSError):
        return "unreachable"
    return "error"


class SharedState:
    """The connection to Redis and its health; built by `create_app`, started and closed by its lifespan."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "flexproxy:",
        timeout_s: float = 0.25,
        on_health: Callable[[bool], None] | None = None,
        wall: Callable[[], float] = time.time,
        max_connections: int = MAX_CONNECTIONS,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.where = where(url)
        self._wall = wall
        self._on_health = on_health or (lambda up: None)
        self._retry = (retry_initial_s, retry_max_s)
        self._health_interval_s = health_interval_s
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            # No socket timeouts of redis-py's own: with one set, a cancelled task (a client that left) was seen to
            # go on with its commands (12 of 12 tries with redis-py 7.4 and 8.2, 0 of 12 without). Every call is
            # bounded by asyncio.timeout instead, connecting and waiting for a free connection included.
            timeout=None,
            socket_timeout=None,
            socket_connect_timeout=None,
            retry=Retry(NoBackoff(), 0),  # a retry would stretch the bound; the next call is the retry
            protocol=2,  # RESP2: every Redis and Valkey speaks it, managed ones included
            client_name="flex-proxy",
        )
        self.redis: Redis = Redis.from_pool(pool)
        self.up = False
        self._health = Health("local", wall(), None, self.where)
        self._wake_watch = asyncio.Event()  # down: try to reconnect now
        self._wake_listen = asyncio.Event()  # up again, or a new channel: (re)subscribe now
        self._warned_at = -1e9
        self._tasks: list[asyncio.Task[None]] = []
        self._on_up: list[Callable[[], Awaitable[None]]] = []
        self._channels: dict[str, Callable[[bytes], None]] = {}
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    @property
    def health(self) -> Health:
        return self._health

    def key(self, tag: str, *parts: str) -> str:
        """`<prefix>{<tag>}:<part>:...`: the keys one script touches share a tag, so one Redis Cluster slot."""
        return f"{self.prefix}{{{tag}}}" + "".join(":" + part for part in parts)

    def channel(self, name: str) -> str:
        return self.prefix + name

    def on_up(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` after every (re)connect, bounded by the timeout, e.g. to re-read what was missed."""
        self._on_up.append(callback)

    async def start(self) -> None:
        """Try Redis once (an unreachable one means local mode, said in one line), then watch its health."""
        try:
            await self._ping()
        except Exception as exc:  # whatever it is, the proxy starts in local mode
            kind = error_kind(exc)
            self._health = Health("local", self._wall(), kind, self.where)
            LOG.warning(
                "shared state %s at start (%s): serving in local mode, each process on its own, until it answers",
                _WHY.get(kind, kind), self.where,
            )  # fmt: skip
        else:
            await self._mark_up(first=True)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch()), loop.create_task(self._listen())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def call(self, command: Callable[[Redis], Awaitable[T]]) -> T:
        """`command(redis)` within the timeout; `SharedDown` if Redis is down, slow or refuses it."""
        if not self.up:
            raise SharedDown(self._health.last_error or "down")
        try:
            async with asyncio.timeout(self.timeout_s):
                return await command(self.redis)
        except Exception as exc:
            _reraise_cancel()  # the caller was cancelled (its client left): not Redis's fault
            kind = error_kind(exc)
            if kind == "error":  # Redis answered, with an error about this command: not Redis being down
                if time.monotonic() - self._warned_at > 60:  # at most a line a minute
                    self._warned_at = time.monotonic()
                    LOG.warning("shared state command failed: %s", type(exc).__name__)
            else:
                self.down(kind)
            raise SharedDown(kind) from None

    def down(self, kind: str) -> None:
        """Go to local mode (said once), and let the watcher try again with backoff."""
        if self.up:
            self.up = False
            self._health = Health("local", self._wall(), kind, self.where)
            self._on_health(False)
            LOG.warning(
                "shared state %s (%s): serving in local mode, each process on its own, until it answers again",
                _WHY.get(kind, kind), self.where,
            )  # fmt: skip
        self._wake_watch.set()
        self._wake_listen.set()

    async def publish(self, name: str, data: bytes) -> bool:
        """Push `data` to every process subscribed to `name`; False when it could not be sent."""
        try:
            await self.call(lambda r: r.publish(self.channel(name), data))
        except SharedDown:
            return False
        return True

    def subscribe(self, name: str, handler: Callable[[bytes], None]) -> None:
        """Call `handler(data)` for each message on `name`, from every (re)connect on; messages sent while this
        process was down are lost, so a subscriber also re-reads its state in `on_up`."""
        self._channels[self.channel(name)] = handler
        self._wake_listen.set()

    async def acquire(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the lease `name` for `owner` unless another holds it; it lapses after `ttl_s` unless renewed."""
        key = self.key(name, "lease")
        return bool(await self.call(lambda r: r.set(key, owner, nx=True, px=max(1, int(ttl_s * 1000)))))

    async def renew(self, name: str, owner: str, ttl_s: float) -> bool:
        key, ttl = self.key(name, "lease"), max(1, int(ttl_s * 1000))
        return bool(await self.call(lambda r: self._renew(keys=[key], args=[owner, ttl])))

    async def release(self, name: str, owner: str) -> bool:
        key = self.key(name, "lease")
        return bool(await self.call(lambda r: self._release(keys=[key], args=[owner])))

    async def _ping(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self.redis.ping()

    async def _mark_up(self, first: bool = False) -> None:
        self.up = True
        self._health = Health("shared", self._wall(), self._health.last_error, self.where)
        self._on_health(True)
        if first:
            LOG.info("shared state connected (%s): flex gates, spend caps and the daily ledger shared", self.where)
        else:
            LOG.info("shared state answers again (%s): shared mode", self.where)
        for callback in self._on_up:
            try:
                async with asyncio.timeout(self.timeout_s * 4):
                    await callback()
            except Exception as exc:  # a catch-up that failed is retried at the next reconnect
                self.down(error_kind(exc))
                return
        self._wake_listen.set()

    async def _watch(self) -> None:
        """While up, a PING every health interval; while down, reconnect attempts with jittered backoff."""
        delay = self._retry[0]
        while True:
            if self.up:
                delay = self._retry[0]
                await _sleep_or(self._wake_watch, self._health_interval_s)
                self._wake_watch.clear()
                if not self.up:
                    continue
                try:
                    await self._ping()
                except Exception as exc:
                    _reraise_cancel()
                    self.down(error_kind(exc))
                continue
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self._retry[1])
            try:
                await self._ping()
            except Exception as exc:
                _reraise_cancel()
                kind = error_kind(exc)
                if kind != self._health.last_error:  # still local mode: only the reason is updated, not logged
                    self._health = Health("local", self._health.since, kind, self.where)
                continue
            await self._mark_up()

    async def _listen(self) -> None:
        """Hold one subscription connection while there are channels and Redis is up; re-made after a drop."""
        while True:
            if not self._channels or not self.up:
                await _sleep_or(self._wake_listen, self._health_interval_s)
                self._wake_listen.clear()
                continue
            pubsub: PubSub = self.redis.pubsub()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await pubsub.subscribe(*self._channels)
                subscribed = set(self._channels)
                while self.up:
                    if set(self._channels) != subscribed:
                        break
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        _deliver(self._channels, message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _reraise_cancel()
                self.down(error_kind(exc))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


_WHY = {
    "unreachable": "unreachable",
    "timeout": "too slow",
    "auth": "refused the password or user",
    "refused": "refused writes (read-only, out of memory or loading)",
}


def _deliver(channels: dict[str, Callable[[bytes], None]], message: dict[str, Any]) -> None:
    channel = message.get("channel")
    name = channel.decode() if isinstance(channel, bytes) else str(channel)
    handler = channels.get(name)
    data = message.get("data")
    if handler is not None and isinstance(data, bytes):
        try:
            handler(data)
        except Exception:
            LOG.exception("shared state: a subscriber of %s failed", name)


def _reraise_cancel() -> None:
    """A cancel a library turned into another error (or lost) is raised again: cancelling must stop the task."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop_then_flush(writer: asyncio.Task[None] | None, flush: Callable[[], Awaitable[None]]) -> None:
    """Stop a background writer, then write what is left (bounded by the timeout; dropped if Redis is away)."""
    if writer is not None:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    with contextlib.suppress(SharedDown):
        await flush()


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
