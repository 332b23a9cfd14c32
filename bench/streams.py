"""Scenario 4, streams: a chat stream of `stream_events` deltas from the simulator, read directly and through
the proxy; time to first event, inter-event gaps, and how much later each event arrives through the proxy.

The simulator gets CPU 0 to itself, the proxy and this client share the others. Unpinned on 2 cores, the
proxy's wake-ups delay the simulator's 5 ms timers by ~0.1 ms an event, which then adds up over the stream
and would be charged to the proxy although it is the upstream that sends later.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from . import procs
from .plan import CHAT_HEADERS, Plan
from .stats import mean, percentile

BODY = '{"model":"o3","stream":true,"messages":[{"role":"user","content":"hi"}]}'


async def read_stream(session: aiohttp.ClientSession, url: str) -> list[float]:
    """Arrival time of each `data:` line, in seconds from just before the request was sent."""
    start = time.perf_counter()
    arrivals: list[float] = []
    async with session.post(url, data=BODY, headers=CHAT_HEADERS) as answer:
        if answer.status != 200:
            raise RuntimeError(f"{url} answered {answer.status}: {(await answer.read())[:300]!r}")
        async for line in answer.content:
            if line.startswith(b"data:"):
                arrivals.append(time.perf_counter() - start)
    return arrivals


async def _measure(plan: Plan, urls: dict[str, str]) -> dict[str, list[list[float]]]:
    runs: dict[str, list[list[float]]] = {name: [] for name in urls}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for url in urls.values():  # warm-up: connections open, code paths hot
            await read_stream(session, url)
        for _ in range(plan.stream_runs):
            for name, url in urls.items():  # alternating, so drift hits both alike
                runs[name].append(await read_stream(session, url))
    return runs


@contextlib.contextmanager
def pinned(upstream_pid: int, proxy_pid: int) -> Iterator[str]:
    """Upstream alone on CPU 0, proxy and this process on the rest; this process's mask restored after."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield "not pinned (one CPU)"
        return
    mine = os.sched_getaffinity(0)
    rest = set(cpus[1:])
    os.sched_setaffinity(upstream_pid, {cpus[0]})
    os.sched_setaffinity(proxy_pid, rest)
    os.sched_setaffinity(0, rest)
    try:
        yield f"simulator on CPU {cpus[0]}; proxy and client on CPU {','.join(map(str, sorted(rest)))}"
    finally:
        os.sched_setaffinity(0, mine)


def run(plan: Plan, work: Path, log_dir: Path) -> dict[str, Any]:
    sim = procs.simulator(log_dir, "streams-sim", flex_busy=0, latency_flex=0, latency_standard=0,
                          stream_events=plan.stream_events, event_interval=plan.stream_interval_s)  # fmt: skip
    proxy = procs.proxy(log_dir, f"http://127.0.0.1:{sim.port}/v1", "streams-proxy")
    with procs.running(sim, proxy), pinned(sim.pid, proxy.pid) as placement:
        urls = {
            "direct": f"http://127.0.0.1:{sim.port}/v1/chat/completions",
            "flex-proxy": f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
        }
        runs = asyncio.run(_measure(plan, urls))
    return {**summarize(runs, plan), "placement": placement}


def summarize(runs: dict[str, list[list[float]]], plan: Plan) -> dict[str, Any]:
    """Per target: time to first event, and the gaps between the role chunk and the content deltas.

    Only those gaps: after the last delta the simulator also sleeps before the usage chunk that the proxy
    strips, so the proxied stream has one double gap before [DONE] that is the upstream's, not the proxy's.
    """
    events = plan.stream_events + 1  # the role chunk, then one a delta
    shortest = min(len(arrivals) for per_target in runs.values() for arrivals in per_target)
    if shortest < events:
        raise RuntimeError(f"a stream had {shortest} data lines, fewer than the {events} expected")
    out: dict[str, Any] = {"events_per_stream": shortest, "gaps_per_stream": events - 1, "runs": plan.stream_runs,
                           "interval_ms": plan.stream_interval_s * 1000}  # fmt: skip
    for name, per_target in runs.items():
        gaps = [(b - a) * 1000 for arrivals in per_target for a, b in itertools.pairwise(arrivals[:events])]
        ttfe = [arrivals[0] * 1000 for arrivals in per_target]
        out[name] = {
            "ttfe_p50_ms": percentile(ttfe, 50),
            "gap_mean_ms": mean(gaps),
            "gap_p50_ms": percentile(gaps, 50),
            "gap_p99_ms": percentile(gaps, 99),
        }
    out["added"] = {
        key: out["flex-proxy"][key] - out["direct"][key] for key in ("ttfe_p50_ms", "gap_mean_ms", "gap_p50_ms")
    }
    return out
