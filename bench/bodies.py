"""Scenario 3, large bodies: chat bodies of 1 MB and 10 MB (one big message), sent one at a time to nginx
canned (which reads the whole body before it answers) directly and through the proxy; the added p50."""

from __future__ import annotations

import http.client
import time
from pathlib import Path
from typing import Any

from . import nginx, procs
from .plan import CHAT_HEADERS, Plan
from .stats import mean, percentile

PATH = "/body/v1/chat/completions"
_FILLER = b"The quick brown fox jumps over the lazy dog, again and again. "


def chat_body(size: int) -> bytes:
    """A chat body of exactly `size` bytes: one user message padded with plain text."""
    head, tail = b'{"model":"o3","messages":[{"role":"user","content":"', b'"}]}'
    room = size - len(head) - len(tail)
    filler = (_FILLER * (room // len(_FILLER) + 1))[:room]
    return head + filler + tail


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[float, int, str]:
    """Seconds from the first byte sent to the last byte of the answer read, with status and served tier."""
    start = time.perf_counter()
    conn.request("POST", path, body=body, headers=CHAT_HEADERS)
    answer = conn.getresponse()
    answer.read()
    return time.perf_counter() - start, answer.status, answer.getheader("x-flex-requested-tier") or "none"


def run(plan: Plan, work: Path, log_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with nginx.canned(log_dir) as canned:
        proxy = procs.proxy(log_dir, f"http://127.0.0.1:{canned.port}/body/v1", "bodies-proxy")
        with procs.running(proxy):
            targets = {
                "direct": (http.client.HTTPConnection("127.0.0.1", canned.port, timeout=60), PATH),
                "flex-proxy": (http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60), "/v1/chat/completions"),
            }  # fmt: skip
            try:
                for size_mb in plan.body_sizes_mb:
                    results[f"{size_mb}MB"] = _size(plan, size_mb * 1_000_000, targets)
            finally:
                for conn, _ in targets.values():
                    conn.close()
    return {"sizes": results, "requests_each": plan.body_requests}


def _size(plan: Plan, size: int, targets: dict[str, tuple[http.client.HTTPConnection, str]]) -> dict[str, Any]:
    body = chat_body(size)
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for i in range(plan.body_warmup + plan.body_requests):
        for name, (conn, path) in targets.items():  # interleaved, so drift hits both alike
            seconds, status, tier = _post(conn, path, body)
            if status != 200:
                raise RuntimeError(f"{name}: {size}-byte body answered {status}")
            if name == "flex-proxy" and tier != "flex":
                raise RuntimeError(f"flex-proxy did not inject flex into a {size}-byte body: {tier}")
            if i >= plan.body_warmup:
                samples[name].append(seconds * 1000)
    out: dict[str, Any] = {"bytes": size}
    for name, values in samples.items():
        out[name] = {
            "p50_ms": percentile(values, 50),
            "p90_ms": percentile(values, 90),
            "mean_ms": mean(values),
            "mb_per_s": size / 1e6 / (percentile(values, 50) / 1000),
        }
    out["added_p50_ms"] = out["flex-proxy"]["p50_ms"] - out["direct"]["p50_ms"]
    out["p50_ratio"] = out["flex-proxy"]["p50_ms"] / out["direct"]["p50_ms"]
    return out
