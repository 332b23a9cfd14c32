"""Scenario 2, held connections: N requests in flight at once through the proxy against an upstream that
takes `held_latency_s` to answer each; the proxy's peak RSS, CPU seconds and the wall time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import procs
from .plan import Plan

_IN_FLIGHT = re.compile(r'^flexproxy_requests_in_flight\{endpoint="chat"\} ([\d.e+]+)$', re.MULTILINE)
POLL_S = 0.2


def in_flight(port: int) -> int | None:
    """The proxy's own count of chat requests being served, from /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            match = _IN_FLIGHT.search(answer.read().decode())
    except OSError:
        return None
    return int(float(match.group(1))) if match else None


def run(plan: Plan, work: Path, log_dir: Path) -> dict[str, Any]:
    """Try the target count, then each fallback count in turn until one fully succeeds."""
    attempts = []
    for count in (plan.held_requests, *plan.held_fallbacks):
        attempt = _level(plan, count, log_dir)
        attempts.append(attempt)
        if attempt["all_ok"]:
            break
    reached = max((a["requests"] for a in attempts if a["all_ok"]), default=0)
    best = next((a for a in attempts if a["all_ok"]), attempts[-1])
    return {"target_requests": plan.held_requests, "reached": reached, "result": best, "attempts": attempts,
            "upstream_latency_s": plan.held_latency_s}  # fmt: skip


def _level(plan: Plan, count: int, log_dir: Path) -> dict[str, Any]:
    latency = plan.held_latency_s
    sim = procs.simulator(log_dir, f"held-sim-{count}", flex_busy=0, latency_flex=latency,
                          latency_standard=latency)  # fmt: skip
    proxy = procs.proxy(log_dir, f"http://127.0.0.1:{sim.port}/v1", f"held-proxy-{count}")
    with procs.running(sim, proxy):
        before = procs.usage(proxy.pid)
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        client_timeout = latency + 60
        client_log = log_dir / f"held-client-{count}.log"
        with client_log.open("ab") as log:
            client = subprocess.Popen(
                [sys.executable, "-m", "bench.held_client", url, str(count), str(client_timeout),
                 str(plan.held_ramp_per_s)],
                cwd=procs.REPO, env=procs.clean_env(), stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
        peak_rss, peak_in_flight, next_metrics = before.rss_mb, 0, 0.0
        deadline = time.monotonic() + client_timeout + 30
        try:
            while client.poll() is None and time.monotonic() < deadline:
                peak_rss = max(peak_rss, procs.usage(proxy.pid).rss_mb)
                if time.monotonic() >= next_metrics:
                    peak_in_flight = max(peak_in_flight, in_flight(proxy.port) or 0)
                    next_metrics = time.monotonic() + 1.0
                time.sleep(POLL_S)
            out, _ = client.communicate(timeout=30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(10)
        after = procs.usage(proxy.pid)
        sim_usage = procs.usage(sim.pid)
    if client.returncode != 0:
        tail = client_log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"held client failed ({client.returncode}): {tail}")
    summary = json.loads(out)
    peak = max(after.hwm_mb, peak_rss)
    return {
        **summary,
        "all_ok": summary["ok"] == count,
        "proxy_rss_idle_mb": round(before.rss_mb, 1),
        "proxy_peak_rss_mb": round(peak, 1),
        "proxy_kb_per_held_request": round((peak - before.rss_mb) * 1024 / count, 1),
        "proxy_cpu_s": round(after.cpu_s - before.cpu_s, 2),
        "proxy_peak_in_flight": peak_in_flight,
        "simulator_peak_rss_mb": round(sim_usage.hwm_mb, 1),
    }
