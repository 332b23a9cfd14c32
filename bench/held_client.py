"""`python -m bench.held_client URL N TIMEOUT RAMP`: start N chat requests at RAMP per second and hold them.

The ramp (a batch every 50 ms) keeps connection attempts within the kernel's listen and SYN queues: past
them, dropped SYNs are retried after 1, 3, 7 s, which would measure the kernel, not the proxy. With the
upstream holding each request far longer than the ramp, all N are in flight at once.

Runs in its own process (its own event loop and open-files limit), prints one JSON summary on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from .nofile import raise_nofile
from .plan import CHAT_HEADERS, SMALL_CHAT_BODY
from .stats import percentile

BATCH_EVERY_S = 0.05


async def _one(session: aiohttp.ClientSession, url: str) -> tuple[str, float, float]:
    """(outcome, started, seconds taken) of one request."""
    start = time.perf_counter()
    try:
        async with session.post(url, data=SMALL_CHAT_BODY, headers=CHAT_HEADERS) as answer:
            await answer.read()
            served = answer.headers.get("x-flex-served-tier", "none")
            outcome = f"ok:{served}" if answer.status == 200 else f"status:{answer.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome = f"error:{type(exc).__name__}"
    return outcome, start, time.perf_counter() - start


async def hold(url: str, count: int, timeout_s: float, ramp_per_s: float) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=count + 16, limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        batch = max(1, round(ramp_per_s * BATCH_EVERY_S))
        tasks = []
        for first in range(0, count, batch):
            tasks += [asyncio.ensure_future(_one(session, url)) for _ in range(min(batch, count - first))]
            await asyncio.sleep(BATCH_EVERY_S)
        ramp = time.perf_counter() - start
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    outcomes = Counter(outcome for outcome, _, _ in results)
    taken = [seconds for _, _, seconds in results]
    ok = sum(n for outcome, n in outcomes.items() if outcome.startswith("ok:"))
    return {
        "requests": count,
        "ok": ok,
        "outcomes": dict(outcomes),
        "ramp_s": ramp,
        "wall_s": wall,
        "latency_min_s": min(taken),
        "latency_p50_s": percentile(taken, 50),
        "latency_p99_s": percentile(taken, 99),
        "latency_max_s": max(taken),
    }


def main(argv: list[str]) -> int:
    url, count, timeout_s, ramp_per_s = argv[0], int(argv[1]), float(argv[2]), float(argv[3])
    raise_nofile()
    try:
        from uvloop import run
    except ImportError:  # the plain loop only makes the client slower, not wrong
        from asyncio import run
    summary = run(hold(url, count, timeout_s, ramp_per_s))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
