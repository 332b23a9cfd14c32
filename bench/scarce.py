"""Scenario 5, scarce flex (issue 9): flex refused for the first `busy_for_s` of every `busy_period_s`, o3
requests arriving open-loop at a fixed rate through the official SDK with a user's defaults (two SDK retries,
a 600 s and a 60 s timeout), the proxy at its defaults (strategy backoff-then-standard).

Rows: the flex gate on (the default) and off, each at both SDK timeouts, a "perfect knowledge" row computed
from the known busy windows (the physical limit), and any tuned rows. Every measured row gets a fresh
simulator and proxy; the simulator's capacity clock is reset right before the first request, so every row
meets the same busy windows at the same moments of its load.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from . import procs
from .plan import Plan
from .stats import percentile

MODEL = "o3"
MESSAGES: list[Any] = [{"role": "user", "content": "Summarise the flex tier in one sentence."}]
# o3, USD per 1M tokens: input, cached input, output. Flex is half of standard.
STANDARD_RATES = (2.0, 0.5, 8.0)
FLEX_RATES = (1.0, 0.25, 4.0)
DEFAULT_ROW = "gate on (defaults)"
GATE_OFF_ROW = "gate off"
UPSTREAM_COUNTERS = ("model_requests", "requested_flex", "flex_429", "served_flex", "served_default")
# Unfinished requests are given this long after the last arrival before they are counted as failures.
GRACE_S = 300.0
_COST = re.compile(r"^(flexproxy_(?:cost_usd|cost_saved_usd|savings_lost_usd)_total)\{[^}]*\} ([\d.e+-]+)$",
                   re.MULTILINE)  # fmt: skip
_GATE = re.compile(r"^flexproxy_gate_(probes|transitions)_total\{([^}]*)\} ([\d.e+-]+)$", re.MULTILINE)


@dataclass(frozen=True)
class Row:
    """One measured configuration: its label, the SDK timeout, the simulator's flex latency and the proxy
    settings besides the defaults."""

    label: str
    timeout_s: float
    latency_flex_s: float
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.label} | {self.timeout_s:g} s"


def rows(plan: Plan) -> list[Row]:
    out: list[Row] = []
    configs: list[tuple[str, dict[str, object]]] = [(DEFAULT_ROW, {}), (GATE_OFF_ROW, {"flex_gate": "false"})]
    configs += [(f"tuned: {settings_text(tuned)}", dict(tuned)) for tuned in plan.scarce_tuned]
    for label, settings in configs:
        out += [Row(label, timeout, plan.scarce_latency_flex_s, settings) for timeout in plan.scarce_timeouts_s]
    # The same workload with slower flex answers, gate at its defaults, at the SDK's default timeout.
    out += [Row(sensitivity_label(latency), plan.scarce_timeouts_s[0], latency) for latency in plan.scarce_sensitivity]
    return out


def sensitivity_label(latency_flex_s: float) -> str:
    return f"{DEFAULT_ROW}, flex answering in {latency_flex_s:g} s"


def settings_text(settings: dict[str, object]) -> str:
    """Settings as the environment variables an operator would set."""
    return " ".join(f"FLEX_PROXY_{key.upper()}={value}" for key, value in settings.items()) or "defaults"


def cost(usage: dict[str, Any], rates: tuple[float, float, float]) -> float:
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    output = int(usage.get("completion_tokens") or 0)
    return ((prompt - cached) * rates[0] + cached * rates[1] + output * rates[2]) / 1e6


def busy_wait_s(arrival_s: float, period_s: float, busy_for_s: float) -> float:
    """How long a request arriving `arrival_s` after the epoch waits for the first moment flex is free."""
    phase = arrival_s % period_s
    return busy_for_s - phase if phase < busy_for_s else 0.0


def perfect(plan: Plan, usage: dict[str, Any], latency_flex_s: float) -> dict[str, Any]:
    """The physical limit: every request sent at the first free moment at or after its arrival, on flex at
    one attempt; latency is that wait plus the flex latency. `usage` is one measured answer's (all alike)."""
    arrivals = [i / plan.scarce_rate_per_s for i in range(plan.scarce_requests)]
    seconds = [busy_wait_s(a, plan.scarce_busy_period_s, plan.scarce_busy_for_s) + latency_flex_s
               for a in arrivals]  # fmt: skip
    n = len(seconds)
    actual, standard = n * cost(usage, FLEX_RATES), n * cost(usage, STANDARD_RATES)
    return {
        "requests": n, "answered": n, "failures": 0, "failure_kinds": {}, "served_flex": n, "flex_share": 1.0,
        "attempts_per_request": 1.0, "proxy_attempts_per_request": 1.0,
        "p50_s": percentile(seconds, 50), "p95_s": percentile(seconds, 95), "max_s": max(seconds),
        "cost_usd": actual, "all_standard_usd": standard, "cost_ratio": actual / standard if standard else 0.0,
        "latency_flex_s": latency_flex_s,
        "waited": sum(1 for a in arrivals if busy_wait_s(a, plan.scarce_busy_period_s, plan.scarce_busy_for_s)),
    }  # fmt: skip


def run(plan: Plan, work: Path, log_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": plan.scarce_requests, "rate_per_s": plan.scarce_rate_per_s,
        "busy_period_s": plan.scarce_busy_period_s, "busy_for_s": plan.scarce_busy_for_s,
        "latency_standard_s": plan.scarce_latency_standard_s, "latency_flex_s": plan.scarce_latency_flex_s,
        "timeouts_s": list(plan.scarce_timeouts_s), "sdk": f"openai {openai.__version__}", "rows": {},
    }  # fmt: skip
    for row in rows(plan):
        result = _row(plan, row, log_dir)
        out["rows"][row.key] = {"label": row.label, "timeout_s": row.timeout_s, "latency_flex_s": row.latency_flex_s,
                                "settings": row.settings, "settings_text": settings_text(row.settings),
                                **result}  # fmt: skip
    usage = next((r["usage"] for r in out["rows"].values() if r.get("usage")), {})
    out["perfect"] = perfect(plan, usage, plan.scarce_latency_flex_s)
    out["perfect_sensitivity"] = [perfect(plan, usage, latency) for latency in plan.scarce_sensitivity]
    return out


def _row(plan: Plan, row: Row, log_dir: Path) -> dict[str, Any]:
    name = re.sub(r"[^a-z0-9]+", "-", row.key.lower()).strip("-")
    sim = procs.simulator(log_dir, f"scarce-sim-{name}", flex_busy=0,
                          latency_standard=plan.scarce_latency_standard_s,
                          latency_flex=row.latency_flex_s)  # fmt: skip
    # The proxy as a user starts it: only where upstream is and the port; log level info is its default.
    proxy = procs.proxy(log_dir, f"http://127.0.0.1:{sim.port}/v1", f"scarce-proxy-{name}", log_level="info",
                        **row.settings)  # fmt: skip
    with procs.running(sim, proxy):
        sim_url = f"http://127.0.0.1:{sim.port}"
        _post_json(f"{sim_url}/_sim/options",
                   {"busy_period_s": plan.scarce_busy_period_s, "busy_for_s": plan.scarce_busy_for_s})  # fmt: skip
        results, wall, lag = asyncio.run(_load(f"http://127.0.0.1:{proxy.port}/v1", sim_url, row.timeout_s, plan))
        sim_stats = _get_json(f"{sim_url}/_sim/stats")
        metrics = _get_text(f"http://127.0.0.1:{proxy.port}/metrics")
    return summarize(results, wall, lag, sim_stats, metrics)


async def _load(base_url: str, sim_url: str, timeout_s: float, plan: Plan) -> tuple[list[dict[str, Any]], float,
                                                                                       float]:  # fmt: skip
    """Open loop: one request every 1/rate s whatever the answers do; returns records, wall time, worst lag."""
    interval = 1.0 / plan.scarce_rate_per_s
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", timeout=timeout_s) as client:
        # A model list (passed through, no model request) so the SDK and the connections are warm; the proxy's
        # gate and observations have seen nothing when the load starts.
        await client.models.list()
        await asyncio.to_thread(_post_json, f"{sim_url}/_sim/reset", {})  # the busy pattern starts now
        start = time.perf_counter()
        tasks: list[asyncio.Task[dict[str, Any]]] = []
        lag = 0.0
        for i in range(plan.scarce_requests):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, time.perf_counter() - (start + i * interval))
            tasks.append(asyncio.create_task(_one(client)))
        done, pending = await asyncio.wait(tasks, timeout=GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    records = [t.result() if t in done else {"ok": False, "kind": "unfinished", "seconds": GRACE_S} for t in tasks]
    return records, wall, lag


async def _one(client: openai.AsyncOpenAI) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        completion = raw.parse()
        record: dict[str, Any] = {
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


def _post_json(url: str, data: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


def proxy_metrics(text: str) -> dict[str, Any]:
    """The proxy's cost counters and its gate's probes by result and transitions by state, summed over labels."""
    totals: Counter[str] = Counter()
    for name, value in _COST.findall(text):
        totals[name] += float(value)
    gate: dict[str, Counter[str]] = {"probes": Counter(), "transitions": Counter()}
    for kind, labels, value in _GATE.findall(text):
        found = re.search(r'(?:result|to)="([^"]*)"', labels)
        gate[kind][found.group(1) if found else "?"] += int(float(value))
    names = ("flexproxy_cost_usd_total", "flexproxy_cost_saved_usd_total", "flexproxy_savings_lost_usd_total")
    return {**{name: totals[name] for name in names}, "gate_probes": dict(gate["probes"]),
            "gate_transitions": dict(gate["transitions"])}  # fmt: skip


def summarize(results: list[dict[str, Any]], wall: float, lag: float, sim_stats: dict[str, int],
              metrics_text: str) -> dict[str, Any]:  # fmt: skip
    n = len(results)
    answered = [r for r in results if r["ok"]]
    on_flex = sum(1 for r in answered if r["tier"] == "flex")
    actual = sum(cost(r["usage"], FLEX_RATES if r["tier"] == "flex" else STANDARD_RATES) for r in answered)
    standard = sum(cost(r["usage"], STANDARD_RATES) for r in answered)
    seconds = [r["seconds"] for r in results]
    upstream = {k: sim_stats.get(k, 0) for k in UPSTREAM_COUNTERS}
    return {
        "requests": n,
        "answered": len(answered),
        "failures": n - len(answered),
        "failure_kinds": dict(Counter(r["kind"] for r in results if not r["ok"])),
        "served_flex": on_flex,
        "flex_share": on_flex / n if n else 0.0,
        "attempts_per_request": upstream["model_requests"] / n if n else 0.0,
        "proxy_attempts_per_request": sum(r["proxy_attempts"] for r in answered) / max(1, len(answered)),
        "p50_s": percentile(seconds, 50),
        "p95_s": percentile(seconds, 95),
        "max_s": max(seconds) if seconds else 0.0,
        "wall_s": wall,
        "arrival_lag_max_ms": lag * 1000,
        "cost_usd": actual,
        "all_standard_usd": standard,
        "cost_ratio": actual / standard if standard else 0.0,
        "usage": answered[0]["usage"] if answered else {},
        "proxy_metrics": proxy_metrics(metrics_text),
        "upstream": upstream,
    }
