"""The open path's cost with shared state configured (issue 15): two proxies in front of nginx canned (flex
always free, so every request takes the gate's open path), one with `FLEX_PROXY_STATE_URL` pointing at a
throwaway redis-server and one without, run back to back at 32 connections taking turns to go first. Each run
gives the proxy's CPU time per request; the verdict is their ratio, pair by pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import nginx, overhead, procs, redis_server, wrk
from .plan import SMALL_CHAT_BODY, Plan
from .redis_server import STATE_URL, wait_shared_up
from .stats import mean, median, ratio, two_standard_errors

LOCAL = "flex-proxy, no shared state"
SHARED = "flex-proxy, Redis configured"


def run(plan: Plan, work: Path, log_dir: Path) -> dict[str, Any]:
    script = wrk.write_script(work / "chat-state.lua", SMALL_CHAT_BODY)
    with nginx.canned(log_dir) as canned, redis_server.server(log_dir, "state-cost-redis") as redis:
        upstream = f"http://127.0.0.1:{canned.port}/v1"
        local = procs.proxy(log_dir, upstream, "state-cost-local")
        shared = procs.proxy(log_dir, upstream, "state-cost-shared")
        shared.env[STATE_URL] = redis_server.url(redis)
        with procs.running_together([local, shared]):
            overhead.check_proxy_injects(local.port)
            overhead.check_proxy_injects(shared.port)
            up = wait_shared_up([shared.port])[0]
            for service in (local, shared):
                wrk.run(_url(service), script, threads=2, connections=32, duration_s=plan.wrk_warmup_s)
            pairs = []
            for i in range(plan.state_pairs):
                figures: dict[str, dict[str, Any]] = {}
                for service in (local, shared) if i % 2 == 0 else (shared, local):
                    commands, redis_cpu = redis_server.commands_processed(redis.port), procs.usage(redis.pid).cpu_s
                    run_ = overhead.measure(_url(service), script, service.pid, 2, 32, plan.state_pair_s)
                    requests = max(1, run_["requests"])
                    run_["redis_commands_per_request"] = (redis_server.commands_processed(redis.port) - commands
                                                          - 1) / requests  # fmt: skip
                    run_["redis_cpu_us_per_request"] = (procs.usage(redis.pid).cpu_s - redis_cpu) / requests * 1e6
                    figures[service.name] = run_
                pairs.append({"local": figures[local.name], "shared": figures[shared.name]})
    return summarize(pairs, up, plan.state_pair_s)


def summarize(pairs: list[dict[str, dict[str, Any]]], up: float | None, pair_s: float) -> dict[str, Any]:
    """The proxy's CPU per request with Redis configured over without, pair by pair, and requests/s likewise."""
    cpu = [ratio(p["shared"]["server_cpu_us_per_request"], p["local"]["server_cpu_us_per_request"]) for p in pairs]
    rps = [ratio(p["shared"]["requests_per_s"], p["local"]["requests_per_s"]) for p in pairs]
    shared = [p["shared"] for p in pairs]
    return {
        "pairs": pairs, "pair_s": pair_s, "shared_state_up": up,
        "cpu_ratios": cpu, "cpu_ratio_mean": mean(cpu), "cpu_ratio_2se": two_standard_errors(cpu),
        "cpu_ratio_median": median(cpu), "rps_ratios": rps, "rps_ratio_mean": mean(rps),
        "local_cpu_us_per_request": mean([p["local"]["server_cpu_us_per_request"] for p in pairs]),
        "shared_cpu_us_per_request": mean([s["server_cpu_us_per_request"] for s in shared]),
        "redis_commands_per_request": mean([s["redis_commands_per_request"] for s in shared]),
        "redis_cpu_us_per_request": mean([s["redis_cpu_us_per_request"] for s in shared]),
        "non_2xx": sum(s["non_2xx"] + p["local"]["non_2xx"] for s, p in zip(shared, pairs, strict=True)),
    }  # fmt: skip


def _url(service: procs.Service) -> str:
    return f"http://127.0.0.1:{service.port}{overhead.PATH}"
