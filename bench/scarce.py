"""Scenario 5, scarce flex: requests against the simulator with flex busy part of the time in bursts, one run
per strategy (X-Flex-On-Unavailable); share served on flex, failures, latency and cost against all-standard.

Each strategy gets a fresh simulator and proxy, so every run sees the same busy windows from its start.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from proxy.sim.options import window_busy

from . import procs
from .plan import CHAT_HEADERS, SMALL_CHAT_BODY, Plan
from .stats import percentile

STRATEGIES = ("backoff", "standard", "backoff-then-standard", "fail")
PROXY_SETTINGS = {"backoff_initial_s": 0.2, "backoff_max_s": 2, "flex_budget_s": 10, "max_flex_attempts": 6}
# o3, USD per 1M tokens: input, cached input, output. Flex is half of standard.
STANDARD_RATES = (2.0, 0.5, 8.0)
FLEX_RATES = (1.0, 0.25, 4.0)
SEED_WINDOWS = 10
UPSTREAM_COUNTERS = ("model_requests", "requested_flex", "flex_429", "served_flex", "served_default")
_METRIC = re.compile(r"^(flexproxy_(?:cost_usd|cost_saved_usd|savings_lost_usd)_total)\{[^}]*\} ([\d.e+-]+)$",
                     re.MULTILINE)  # fmt: skip


def choose_seed(share: float, windows: int = SEED_WINDOWS) -> tuple[int, list[bool]]:
    """The first simulator seed whose first `windows` capacity windows are busy in `share` of them, starting
    free then busy, so every strategy meets a burst early and the busy share of the run is near `share`."""
    want = round(share * windows)
    for seed in range(100_000):
        pattern = [window_busy(seed, w, share) for w in range(windows)]
        if not pattern[0] and pattern[1] and sum(pattern) == want:
            return seed, pattern
    raise RuntimeError(f"no seed gives {want} busy windows of {windows}")


def cost(usage: dict[str, Any], rates: tuple[float, float, float]) -> float:
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    output = int(usage.get("completion_tokens") or 0)
    return ((prompt - cached) * rates[0] + cached * rates[1] + output * rates[2]) / 1e6


async def _load(url: str, strategy: str, count: int, concurrency: int) -> tuple[list[dict[str, Any]], float]:
    headers = {**CHAT_HEADERS, "X-Flex-On-Unavailable": strategy}
    results: list[dict[str, Any]] = []
    issued = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while issued < count:
            issued += 1
            start = time.perf_counter()
            record: dict[str, Any] = {}
            try:
                async with session.post(url, data=SMALL_CHAT_BODY, headers=headers) as answer:
                    body = await answer.read()
                    record = {"status": answer.status, "tier": answer.headers.get("x-flex-served-tier", "none"),
                              "attempts": int(answer.headers.get("x-flex-attempts", "0"))}  # fmt: skip
                    if answer.status == 200:
                        record["usage"] = json.loads(body).get("usage") or {}
            except (aiohttp.ClientError, TimeoutError) as exc:
                record = {"status": 0, "tier": "none", "attempts": 0, "error": type(exc).__name__}
            record["seconds"] = time.perf_counter() - start
            results.append(record)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return results, time.perf_counter() - start


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def _proxy_costs(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    totals: Counter[str] = Counter()
    for name, value in _METRIC.findall(text):
        totals[name] += float(value)
    return {name: totals[name] for name in ("flexproxy_cost_usd_total", "flexproxy_cost_saved_usd_total",
                                            "flexproxy_savings_lost_usd_total")}  # fmt: skip


def run(plan: Plan, work: Path, log_dir: Path) -> dict[str, Any]:
    seed, pattern = choose_seed(plan.scarce_busy_share)
    out: dict[str, Any] = {"seed": seed, "busy_windows": pattern, "burst_s": plan.scarce_burst_s,
                           "requests": plan.scarce_requests, "concurrency": plan.scarce_concurrency,
                           "proxy_settings": PROXY_SETTINGS, "strategies": {}}  # fmt: skip
    for strategy in STRATEGIES:
        out["strategies"][strategy] = _strategy(plan, strategy, seed, log_dir)
    return out


def _strategy(plan: Plan, strategy: str, seed: int, log_dir: Path) -> dict[str, Any]:
    sim = procs.simulator(log_dir, f"scarce-sim-{strategy}", seed=seed, flex_busy=plan.scarce_busy_share,
                          burst_s=plan.scarce_burst_s, latency_standard=plan.scarce_latency_standard_s,
                          latency_flex=plan.scarce_latency_flex_s)  # fmt: skip
    # The proxy first: the simulator's capacity windows count from its own start, just before the load.
    proxy = procs.proxy(log_dir, f"http://127.0.0.1:{sim.port}/v1", f"scarce-proxy-{strategy}", **PROXY_SETTINGS)
    with procs.running(proxy, sim):
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        results, wall = asyncio.run(_load(url, strategy, plan.scarce_requests, plan.scarce_concurrency))
        sim_stats = _get_json(f"http://127.0.0.1:{sim.port}/_sim/stats")
        metrics = _proxy_costs(proxy.port)
    return summarize(results, wall, sim_stats, metrics)


def summarize(results: list[dict[str, Any]], wall: float, sim_stats: dict[str, int],
              metrics: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    answered = [r for r in results if r["status"] == 200]
    actual = sum(cost(r["usage"], FLEX_RATES if r["tier"] == "flex" else STANDARD_RATES) for r in answered)
    standard = sum(cost(r["usage"], STANDARD_RATES) for r in answered)
    seconds = [r["seconds"] * 1000 for r in results]
    return {
        "requests": len(results),
        "answered": len(answered),
        "failures": len(results) - len(answered),
        "failure_statuses": dict(Counter(str(r["status"]) for r in results if r["status"] != 200)),
        "served_flex": sum(1 for r in answered if r["tier"] == "flex"),
        "flex_share": sum(1 for r in answered if r["tier"] == "flex") / len(results) if results else 0.0,
        "p50_ms": percentile(seconds, 50),
        "p95_ms": percentile(seconds, 95),
        "max_ms": max(seconds) if seconds else 0.0,
        "mean_attempts": sum(r["attempts"] for r in results) / len(results) if results else 0.0,
        "wall_s": wall,
        "cost_usd": actual,
        "all_standard_usd": standard,
        "cost_ratio": actual / standard if standard else 0.0,
        "proxy_metrics": metrics,
        "flex_refused_share": sim_stats.get("flex_429", 0) / max(1, sim_stats.get("requested_flex", 0)),
        "upstream": {k: sim_stats.get(k, 0) for k in UPSTREAM_COUNTERS},
    }
