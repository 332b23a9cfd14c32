"""Scenario 5, scarce flex (issues 9 and 14): the plan's flex workloads (a batch script, four clients at once,
an open loop, long busy spells), each through the official SDK with a user's defaults (two SDK retries) and the
proxy at its defaults (strategy backoff-then-standard), with the flex gate on (the default) and off, at every
SDK timeout the workload names.

Every measured row gets a fresh simulator and proxy; the simulator's capacity clock is reset right before the
first request, so every row meets the same busy windows at the same moments of its load. Each workload also
has a "perfect knowledge" row computed from the known busy windows (the physical limit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from . import load, procs
from .plan import WORKLOAD_NAMES, Plan, Workload
from .stats import percentile

# o3, USD per 1M tokens: input, cached input, output. Flex is half of standard.
STANDARD_RATES = (2.0, 0.5, 8.0)
FLEX_RATES = (1.0, 0.25, 4.0)
DEFAULT_ROW = "gate on (defaults)"
GATE_OFF_ROW = "gate off"
UPSTREAM_COUNTERS = ("model_requests", "requested_flex", "flex_429", "served_flex", "served_default")
_COST = re.compile(r"^(flexproxy_(?:cost_usd|cost_saved_usd|savings_lost_usd)_total)\{[^}]*\} ([\d.e+-]+)$",
                   re.MULTILINE)  # fmt: skip
_GATE = re.compile(r"^flexproxy_gate_(probes|transitions)_total\{([^}]*)\} ([\d.e+-]+)$", re.MULTILINE)
COST_NAMES = ("flexproxy_cost_usd_total", "flexproxy_cost_saved_usd_total", "flexproxy_savings_lost_usd_total")


@dataclass(frozen=True)
class Row:
    """One measured configuration: its label, the SDK timeout and the proxy settings besides the defaults."""

    label: str
    timeout_s: float
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.label} | {self.timeout_s:g} s"


def rows(workload: Workload) -> list[Row]:
    """The gate on (the defaults) then off, each at every timeout of the workload."""
    configs: list[tuple[str, dict[str, object]]] = [(DEFAULT_ROW, {}), (GATE_OFF_ROW, {"flex_gate": "false"})]
    return [Row(label, timeout, settings) for label, settings in configs for timeout in workload.timeouts_s]


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


def ideal_waits(workload: Workload) -> list[float]:
    """Each request's wait for free flex when every request is sent at the first free moment and answered on
    flex at one attempt. Open loop: arrivals every 1/rate s. Closed loop: each client sends its next request
    when the previous answer arrives, so its timeline is wait, flex latency, wait, ...; all clients alike."""
    period, busy = workload.busy_period_s, workload.busy_for_s
    if not workload.clients:
        return [busy_wait_s(i / workload.rate_per_s, period, busy) for i in range(workload.requests)]
    waits: list[float] = []
    now = 0.0
    for _ in range(workload.per_client):
        wait = busy_wait_s(now, period, busy)
        waits.append(wait)
        now += wait + workload.latency_flex_s
    return waits * workload.clients


def perfect(workload: Workload, usage: dict[str, Any]) -> dict[str, Any]:
    """The physical limit: every request sent at the first free moment, on flex at one attempt; latency is that
    wait plus the flex latency. `usage` is one measured answer's (all alike)."""
    waits = ideal_waits(workload)
    seconds = [wait + workload.latency_flex_s for wait in waits]
    n = len(seconds)
    actual, standard = n * cost(usage, FLEX_RATES), n * cost(usage, STANDARD_RATES)
    return {
        "requests": n, "answered": n, "failures": 0, "failure_kinds": {}, "served_flex": n, "flex_share": 1.0,
        "attempts_per_request": 1.0, "proxy_attempts_per_request": 1.0,
        "p50_s": percentile(seconds, 50), "p95_s": percentile(seconds, 95), "max_s": max(seconds),
        "cost_usd": actual, "all_standard_usd": standard, "cost_ratio": actual / standard if standard else 0.0,
        "waited": sum(1 for wait in waits if wait > 0),
        "wall_s": _ideal_wall_s(workload, seconds),
    }  # fmt: skip


def _ideal_wall_s(workload: Workload, seconds: list[float]) -> float:
    """A closed loop's length is one client's requests one after another; an open loop's, the last end."""
    if workload.clients:
        return sum(seconds) / workload.clients
    return max(i / workload.rate_per_s + s for i, s in enumerate(seconds))


def describe(workload: Workload) -> dict[str, Any]:
    """The workload's parameters as the report shows them."""
    return {**dataclasses.asdict(workload), "per_client": workload.per_client}


def run(plan: Plan, work: Path, log_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"sdk": f"openai {openai.__version__}", "workloads": {}}
    for workload in plan.chosen(WORKLOAD_NAMES):
        began = time.monotonic()
        measured: dict[str, Any] = {}
        for row in rows(workload):
            measured[row.key] = {"label": row.label, "timeout_s": row.timeout_s, "settings": row.settings,
                                 "settings_text": settings_text(row.settings),
                                 **_row(workload, row, log_dir)}  # fmt: skip
        out["workloads"][workload.name] = {**describe(workload), "rows": measured,
                                           "perfect": perfect(workload, first_usage(measured.values())),
                                           "seconds": round(time.monotonic() - began, 1)}  # fmt: skip
    return out


def first_usage(rows_: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return next((r["usage"] for r in rows_ if r.get("usage")), {})


def simulator(workload: Workload, log_dir: Path, name: str) -> procs.Service:
    """A simulator with the workload's latencies and busy pattern (counted from its next reset), no random
    busy windows."""
    return procs.simulator(log_dir, name, flex_busy=0, latency_standard=workload.latency_standard_s,
                           latency_flex=workload.latency_flex_s, busy_period_s=workload.busy_period_s,
                           busy_for_s=workload.busy_for_s)  # fmt: skip


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _row(workload: Workload, row: Row, log_dir: Path) -> dict[str, Any]:
    name = slug(f"{workload.name} {row.key}")
    sim = simulator(workload, log_dir, f"scarce-sim-{name}")
    # The proxy as a user starts it: only where upstream is and the port; log level info is its default.
    proxy = procs.proxy(log_dir, f"http://127.0.0.1:{sim.port}/v1", f"scarce-proxy-{name}", log_level="info",
                        **row.settings)  # fmt: skip
    with procs.running_together([sim, proxy]):  # the proxy needs no upstream to start
        sim_url = f"http://127.0.0.1:{sim.port}"
        results, wall, lag = asyncio.run(load.run(workload, [f"http://127.0.0.1:{proxy.port}/v1"], row.timeout_s,
                                                  sim_url))  # fmt: skip
        sim_stats = load.get_json(f"{sim_url}/_sim/stats")
        metrics = load.get_text(f"http://127.0.0.1:{proxy.port}/metrics")
    return summarize(results, wall, lag, sim_stats, [metrics])


def proxy_metrics(texts: Iterable[str]) -> dict[str, Any]:
    """The proxies' cost counters and their gates' probes by result and transitions by state, summed over
    labels and processes."""
    totals = dict.fromkeys(COST_NAMES, 0.0)
    gate: dict[str, Counter[str]] = {"probes": Counter(), "transitions": Counter()}
    for text in texts:
        for name, value in _COST.findall(text):
            totals[name] = totals.get(name, 0.0) + float(value)
        for kind, labels, value in _GATE.findall(text):
            found = re.search(r'(?:result|to)="([^"]*)"', labels)
            gate[kind][found.group(1) if found else "?"] += int(float(value))
    return {**{name: totals[name] for name in COST_NAMES}, "gate_probes": dict(gate["probes"]),
            "gate_transitions": dict(gate["transitions"])}  # fmt: skip


def summarize(results: list[dict[str, Any]], wall: float, lag: float, sim_stats: dict[str, int],
              metrics_texts: list[str]) -> dict[str, Any]:  # fmt: skip
    """A row's figures: answered, on flex (as the client was told), upstream attempts a request (counted at
    the simulator), cost against the same answers all on standard, latency, failures by kind."""
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
        "proxy_metrics": proxy_metrics(metrics_texts),
        "upstream": upstream,
    }
