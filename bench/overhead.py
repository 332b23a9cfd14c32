"""Scenario 1, overhead: the small chat POST through wrk against nginx canned (direct), nginx as a plain
reverse proxy in front of it, and flex-proxy in front of it with the flex gate on (its default) and off; at 1
and at 32 connections."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Any

from . import gatecost, nginx, procs, wrk
from .plan import CHAT_HEADERS, SMALL_CHAT_BODY, Plan
from .stats import mean, median, ratio, two_standard_errors

PATH = "/v1/chat/completions"
GATE_OFF = "flex-proxy gate off"
TARGETS = ("direct", "nginx", "flex-proxy", GATE_OFF)


def check_proxy_injects(port: int) -> dict[str, str]:
    """One request through the proxy, to be sure the figures are of flex-injected requests answered 200."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{PATH}", data=SMALL_CHAT_BODY.encode(),
        headers=CHAT_HEADERS,
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:
        json.loads(answer.read())
        headers = {k.lower(): v for k, v in answer.headers.items() if k.lower().startswith("x-flex-")}
        if answer.status != 200 or headers.get("x-flex-requested-tier") != "flex":
            raise RuntimeError(f"flex-proxy did not inject flex: {answer.status} {headers}")
        return headers


def run(plan: Plan, work: Path, log_dir: Path) -> dict[str, Any]:
    script = wrk.write_script(work / "chat.lua", SMALL_CHAT_BODY)
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in TARGETS}
    with nginx.canned(log_dir) as canned:
        relay = nginx.relay(log_dir, canned.port)
        proxy = procs.proxy(log_dir, f"http://127.0.0.1:{canned.port}/v1")
        gate_off = procs.proxy(log_dir, f"http://127.0.0.1:{canned.port}/v1", "flex-proxy-gate-off", flex_gate="false")
        with procs.running(relay, proxy, gate_off):
            headers = check_proxy_injects(proxy.port)
            check_proxy_injects(gate_off.port)
            services = {"direct": canned, "nginx": relay, "flex-proxy": proxy, GATE_OFF: gate_off}
            for round_ in range(plan.wrk_rounds):  # interleaved, so drift on a shared machine hits all alike
                order = list(TARGETS)
                if round_ % 2:  # gate on and off take turns to go first, so neither always follows the other
                    order[2], order[3] = order[3], order[2]
                for name in order:
                    service = services[name]
                    url = f"http://127.0.0.1:{service.port}{PATH}"
                    if round_ == 0:
                        wrk.run(url, script, threads=2, connections=32, duration_s=plan.wrk_warmup_s)
                    for threads, connections in plan.wrk_connections:
                        rounds[name].setdefault(f"c{connections}", []).append(
                            measure(url, script, service.pid, threads, connections, plan.wrk_duration_s)
                        )
            pairs = _gate_pairs(plan, script, services["flex-proxy"], services[GATE_OFF])
    results = {name: {level: _mean(runs) for level, runs in levels.items()} for name, levels in rounds.items()}
    gate = {level: gate_round_ratios(rounds, level) for level in rounds["flex-proxy"]}
    ratios = gate["c32"] + [ratio(on["requests_per_s"], off["requests_per_s"]) for on, off in pairs]
    cpu = results["flex-proxy"]["c32"]["server_cpu_us_per_request"]
    open_path = gatecost.open_path_ns()
    return {"targets": results, "compare": _compare(results), "proxy_headers": headers, "rounds": rounds,
            "gate_round_ratios": gate, "gate_pairs": pairs, "gate_ratios_c32": ratios,
            "gate_ratio_c32_median": median(ratios), "gate_ratio_c32_mean": mean(ratios),
            "gate_ratio_c32_2se": two_standard_errors(ratios), "gate_pair_s": plan.gate_pair_s,
            "gate_open_path_ns": open_path, "gate_open_path_share_of_cpu": open_path / 1000 / cpu if cpu else math.nan,
            "body": SMALL_CHAT_BODY, "canned_answer_bytes": len(nginx.canned_answer_text())}  # fmt: skip


def _gate_pairs(plan: Plan, script: Path, on: Any, off: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Extra back-to-back runs of the proxy with the gate on and off at 32 connections, taking turns to go
    first, so the verdict rests on many paired ratios rather than on a few rounds' means."""
    pairs = []
    for i in range(plan.gate_pairs):
        figures = {}
        for service in (on, off) if i % 2 == 0 else (off, on):
            url = f"http://127.0.0.1:{service.port}{PATH}"
            figures[service.name] = measure(url, script, service.pid, 2, 32, plan.gate_pair_s)
        pairs.append((figures[on.name], figures[off.name]))
    return pairs


def measure(url: str, script: Path, pid: int, threads: int, connections: int, duration_s: float) -> dict[str, Any]:
    cpu_before = procs.tree_cpu_s(pid)
    figures = wrk.run(url, script, threads=threads, connections=connections, duration_s=duration_s).as_dict()
    cpu = procs.tree_cpu_s(pid) - cpu_before
    figures["server_cpu_s"] = cpu
    figures["server_cpu_us_per_request"] = cpu / max(1, figures["requests"]) * 1e6
    return figures


def _mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's mean over the rounds, plus the spread of requests/s."""
    out = {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}
    out["rps_min"] = min(run["requests_per_s"] for run in runs)
    out["rps_max"] = max(run["requests_per_s"] for run in runs)
    out["rounds"] = len(runs)
    return out


def _compare(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each target against direct: throughput ratio and added p50/p99, per connection count."""
    out: dict[str, dict[str, Any]] = {}
    for name in TARGETS[1:]:
        out[name] = {}
        for level, figures in results[name].items():
            direct = results["direct"][level]
            out[name][level] = {
                "rps_ratio_vs_direct": ratio(figures["requests_per_s"], direct["requests_per_s"]),
                "added_p50_ms": figures["p50_ms"] - direct["p50_ms"],
                "added_p99_ms": figures["p99_ms"] - direct["p99_ms"],
            }
        if name == "flex-proxy":
            for level, figures in results[name].items():
                out[name][level]["rps_ratio_vs_nginx"] = ratio(
                    figures["requests_per_s"], results["nginx"][level]["requests_per_s"]
                )
                off = results[GATE_OFF][level]
                out[name][level]["rps_ratio_vs_gate_off"] = ratio(figures["requests_per_s"], off["requests_per_s"])
                out[name][level]["added_p50_ms_vs_gate_off"] = figures["p50_ms"] - off["p50_ms"]
    return out


def gate_round_ratios(rounds: dict[str, dict[str, list[dict[str, Any]]]], level: str) -> list[float]:
    """Gate on over gate off, requests/s, round by round (each pair measured back to back)."""
    on, off = rounds["flex-proxy"][level], rounds[GATE_OFF][level]
    return [ratio(a["requests_per_s"], b["requests_per_s"]) for a, b in zip(on, off, strict=True)]
