"""The flex workloads' clients: o3 chat requests through the official SDK (`openai.AsyncOpenAI`, its default
retries), open loop or closed loops, spread round-robin over one or more proxies. Each request gives a record:
answered or not (and how it failed), the tier it was served on, its usage and its time as the client saw it."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import openai

from .plan import Workload

MODEL = "o3"
MESSAGES: list[Any] = [{"role": "user", "content": "Summarise the flex tier in one sentence."}]
# Unfinished requests are given this long after the last arrival before they are counted as failures.
GRACE_S = 300.0
Record = dict[str, Any]


async def run(workload: Workload, base_urls: Sequence[str], timeout_s: float,
              sim_url: str) -> tuple[list[Record], float, float]:  # fmt: skip
    """The workload's load, request (open loop) or client (closed loop) i through `base_urls[i % n]`; returns
    records, wall time and the worst arrival lag. The simulator's busy pattern is reset right before the first
    request, after every client has warmed up."""
    sdk_clients = workload.clients or len(base_urls)  # a closed loop's clients, or one per proxy
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(openai.AsyncOpenAI(base_url=base_urls[i % len(base_urls)],
                                                               api_key="sk-bench", timeout=timeout_s))
            for i in range(sdk_clients)
        ]  # fmt: skip
        # A model list each (passed through, no model request) so the SDK and the connections are warm; the
        # proxies' gates and observations have seen nothing when the load starts.
        await asyncio.gather(*(client.models.list() for client in clients))
        await asyncio.to_thread(post_json, f"{sim_url}/_sim/reset", {})  # the busy pattern starts now
        if workload.clients:
            return await _closed(workload, clients)
        return await _open(workload, clients)


async def _open(workload: Workload, clients: Sequence[openai.AsyncOpenAI]) -> tuple[list[Record], float, float]:
    """One request every 1/rate s whatever the answers do, request i through client i % n."""
    interval = 1.0 / workload.rate_per_s
    start = time.perf_counter()
    tasks: list[asyncio.Task[Record]] = []
    lag = 0.0
    for i in range(workload.requests):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag = max(lag, time.perf_counter() - (start + i * interval))
        tasks.append(asyncio.create_task(one(clients[i % len(clients)])))
    records = await _finish(tasks, GRACE_S)
    return records, time.perf_counter() - start, lag


async def _closed(workload: Workload, clients: Sequence[openai.AsyncOpenAI]) -> tuple[list[Record], float, float]:
    """Each client sends its share one after another. The whole load is bounded: a loop still going after
    `closed_limit_s` is cut; its request in flight counts as "unfinished" and the rest as "not sent"."""
    start = time.perf_counter()
    per_client = workload.per_client
    kept: list[list[Record]] = [[] for _ in clients]
    loops = [asyncio.create_task(_loop(client, per_client, into)) for client, into in zip(clients, kept, strict=True)]
    _, pending = await asyncio.wait(loops, timeout=closed_limit_s(workload))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    records: list[Record] = []
    for got in kept:
        missing = [{"ok": False, "kind": "not sent", "seconds": 0.0, "proxy_attempts": 0}
                   for _ in range(per_client - len(got))]  # fmt: skip
        if missing:
            missing[0] = {**missing[0], "kind": "unfinished", "seconds": closed_limit_s(workload)}
        records += got + missing
    return records, wall, 0.0


async def _loop(client: openai.AsyncOpenAI, count: int, into: list[Record]) -> None:
    for _ in range(count):
        into.append(await one(client))


def closed_limit_s(workload: Workload) -> float:
    """How long closed loops may run: four times the ideal (every request at a flex latency after waiting out
    every busy part) plus the grace, so only a stuck load is cut."""
    ideal = workload.per_client * workload.latency_flex_s / (1 - workload.busy_for_s / workload.busy_period_s)
    return 4 * ideal + GRACE_S


async def _finish(tasks: list[asyncio.Task[Record]], grace_s: float) -> list[Record]:
    done, pending = await asyncio.wait(tasks, timeout=grace_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [t.result() if t in done else {"ok": False, "kind": "unfinished", "seconds": grace_s,
                                           "proxy_attempts": 0} for t in tasks]  # fmt: skip


async def one(client: openai.AsyncOpenAI) -> Record:
    """One o3 chat request as a user sends it; the tier is the proxy's `x-flex-served-tier` or the answer's
    `service_tier`."""
    start = time.perf_counter()
    try:
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        completion = raw.parse()
        record: Record = {
            "ok": True,
            "tier": raw.headers.get("x-flex-served-tier") or completion.service_tier or "none",
            "proxy_attempts": int(raw.headers.get("x-flex-attempts") or 0),
            "usage": completion.usage.model_dump() if completion.usage else {},
        }
    except openai.APIStatusError as exc:
        record = {"ok": False, "kind": f"HTTP {exc.status_code}", "proxy_attempts": 0}
    except openai.APIError as exc:  # timeouts and connection errors, after the SDK's own retries
        record = {"ok": False, "kind": type(exc).__name__, "proxy_attempts": 0}
    record["seconds"] = time.perf_counter() - start
    return record


def post_json(url: str, data: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())
