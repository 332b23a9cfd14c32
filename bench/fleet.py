"""Scenario 6, a fleet (issue 15): N proxy processes in front of one simulator, the clients spread round-robin
over them, on the bursty open loop and on the long busy spells, each with and without shared state in Redis
(`FLEX_PROXY_STATE_URL` pointing at a throwaway `redis-server`), the gate at its defaults. Then the open path's
cost with Redis configured while flex is free (`bench/state_cost.py`).

Every row gets a fresh simulator, fresh proxies and, with Redis, a fresh redis-server, so no row inherits
another's gate state, spend or ledger.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from . import load, procs, redis_server, scarce, state_cost
from .plan import Plan, Workload
from .redis_server import STATE_URL, shared_state_up, wait_shared_up


@dataclass(frozen=True)
class FleetRow:
    """How many proxy processes, and whether they share state through Redis."""

    processes: int
    shared: bool

    @property
    def key(self) -> str:
        return f"{self.processes} {'process' if self.processes == 1 else 'processes'}, " + (
            "Redis" if self.shared else "no Redis"
        )


def rows(plan: Plan) -> list[FleetRow]:
    return [FleetRow(n, shared) for n in plan.fleet_sizes for shared in (False, True)]


def run(plan: Plan, work: Path, log_dir: Path) -> dict[str, Any]:
    redis_server.binary()  # fail now, naming the package
    out: dict[str, Any] = {"sdk": f"openai {openai.__version__}", "redis_version": redis_server.version(),
                           "state_url_variable": STATE_URL, "workloads": {}}  # fmt: skip
    for workload in plan.chosen(plan.fleet_workloads):
        began = time.monotonic()
        timeout = workload.timeouts_s[0]
        measured = {row.key: {"processes": row.processes, "shared": row.shared, "timeout_s": timeout,
                              **_row(workload, row, timeout, log_dir)} for row in rows(plan)}  # fmt: skip
        ideal = scarce.perfect(workload, scarce.first_usage(measured.values()))
        out["workloads"][workload.name] = {**scarce.describe(workload), "timeout_s": timeout, "rows": measured,
                                           "perfect": ideal, "seconds": round(time.monotonic() - began, 1)}  # fmt: skip
    began = time.monotonic()
    out["open_path"] = {**state_cost.run(plan, work, log_dir), "seconds": round(time.monotonic() - began, 1)}
    return out


def _row(workload: Workload, row: FleetRow, timeout_s: float, log_dir: Path) -> dict[str, Any]:
    name = scarce.slug(f"fleet {workload.name} {row.key}")
    sim = scarce.simulator(workload, log_dir, f"{name}-sim")
    redis = redis_server.server(log_dir, f"{name}-redis") if row.shared else None
    proxies = [procs.proxy(log_dir, f"http://127.0.0.1:{sim.port}/v1", f"{name}-proxy-{i}", log_level="info")
               for i in range(row.processes)]  # fmt: skip
    if redis is not None:
        for proxy in proxies:
            proxy.env[STATE_URL] = redis_server.url(redis)  # environment only: it may hold a password
    ports = [proxy.port for proxy in proxies]
    # Redis first, so the proxies start in shared mode; they need no upstream to start.
    with procs.running(*([redis] if redis is not None else [])), procs.running_together([sim, *proxies]):
        up_before = wait_shared_up(ports) if redis is not None else []
        commands_before = redis_server.commands_processed(redis.port) if redis is not None else 0
        sim_url = f"http://127.0.0.1:{sim.port}"
        urls = [f"http://127.0.0.1:{port}/v1" for port in ports]
        results, wall, lag = asyncio.run(load.run(workload, urls, timeout_s, sim_url))
        sim_stats = load.get_json(f"{sim_url}/_sim/stats")
        texts = [load.get_text(f"http://127.0.0.1:{port}/metrics") for port in ports]
        commands = redis_server.commands_processed(redis.port) - commands_before - 1 if redis is not None else 0
    summary = scarce.summarize(results, wall, lag, sim_stats, texts)
    return {**summary, "shared_state_up_before": up_before,
            "shared_state_up_after": [shared_state_up(text) for text in texts],
            "redis_commands_per_request": commands / summary["requests"] if summary["requests"] else 0.0}  # fmt: skip
