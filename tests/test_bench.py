"""The benchmark harness: its parsers, and one quick run of every scenario end to end (needs nginx and wrk)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import nginx, report, scarce, wrk
from bench.bodies import chat_body
from bench.plan import Plan
from bench.stats import percentile, two_standard_errors

REPO = Path(__file__).resolve().parent.parent

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.81ms    4.10ms  52.30ms   85.12%
    Req/Sec     1.65k   120.00     1.90k    70.00%
  Latency Distribution
     50%  905.00us
     75%   10.50ms
     90%   14.20ms
     99%    1.02s
  32838 requests in 10.01s, 25.12MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   3280.55
Transfer/sec:      2.51MB
"""


def test_wrk_report_is_read_with_its_units() -> None:
    result = wrk.parse(WRK_OUTPUT)
    assert result.requests_per_s == 3280.55
    assert result.requests == 32838
    assert result.p50_ms == pytest.approx(0.905)
    assert result.p75_ms == pytest.approx(10.5)
    assert result.p99_ms == pytest.approx(1020.0)
    assert (result.non_2xx, result.socket_errors) == (4, 3)


def test_incomplete_wrk_report_is_an_error() -> None:
    with pytest.raises(ValueError, match="wrk --latency"):
        wrk.parse("Running 1s test @ http://127.0.0.1:1/\nRequests/sec: 10.0\n")


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 50, math.nan), ([3.0], 99, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5), ([4.0, 1.0, 3.0, 2.0], 100, 4.0)],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    got = percentile(values, q)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_two_standard_errors() -> None:
    assert two_standard_errors([1.0, 1.0, 1.0]) == 0.0
    assert two_standard_errors([0.9, 1.1]) == pytest.approx(2 * math.sqrt(0.02) / math.sqrt(2))
    assert math.isnan(two_standard_errors([1.0]))


@pytest.mark.parametrize(
    ("share", "centre", "spread", "met"),
    [
        (0.0023, 0.994, 0.073, True),  # a cheap open path, and wrk too noisy to say otherwise
        (0.0023, 0.958, 0.030, True),  # wrk's interval reaches above x0.97: no evidence of a cost
        (0.04, 1.0, 0.01, False),  # the open path alone is over 3% of a request's CPU
        (0.0023, 0.90, 0.05, False),  # wrk shows a cost above 3% beyond its noise
    ],
)
def test_gate_verdict_rests_on_the_open_path_unless_wrk_shows_a_cost(
    share: float, centre: float, spread: float, met: bool
) -> None:
    overhead = {"gate_open_path_share_of_cpu": share, "gate_open_path_ns": 1200.0, "gate_ratio_c32_mean": centre,
                "gate_ratio_c32_2se": spread, "gate_ratios_c32": [centre] * 12}  # fmt: skip
    text, got = report.gate_verdict(overhead)
    assert got is met
    assert f"{share:.2%}" in text and "of 12" in text


def test_chat_body_has_the_exact_size_and_is_json() -> None:
    body = chat_body(1_000_000)
    assert len(body) == 1_000_000
    assert json.loads(body)["model"] == "o3"


def test_o3_cost_prices_cached_and_output_tokens() -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 400}}
    assert scarce.cost(usage, scarce.STANDARD_RATES) == pytest.approx((600 * 2 + 400 * 0.5 + 100 * 8) / 1e6)
    assert scarce.cost(usage, scarce.FLEX_RATES) == pytest.approx(scarce.cost(usage, scarce.STANDARD_RATES) / 2)


@pytest.mark.parametrize(
    ("arrival", "wait"), [(0.0, 3.0), (0.1, 2.9), (2.9, 0.1), (3.0, 0.0), (9.9, 0.0), (10.0, 3.0), (21.5, 1.5)]
)
def test_busy_wait_is_the_time_to_the_end_of_the_busy_part(arrival: float, wait: float) -> None:
    assert scarce.busy_wait_s(arrival, 10.0, 3.0) == pytest.approx(wait)


def test_perfect_knowledge_row_is_the_physical_limit() -> None:
    """Issue 9's workload: 300 arrivals at 10/s, flex busy 3 s of every 10 s, flex answering in 0.3 s."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 100}
    row = scarce.perfect(Plan.full(), usage, 0.3)
    assert (row["requests"], row["answered"], row["failures"], row["waited"]) == (300, 300, 0, 90)
    assert (row["flex_share"], row["attempts_per_request"]) == (1.0, 1.0)
    assert row["p50_s"] == pytest.approx(0.3)
    assert row["max_s"] == pytest.approx(3.3)  # arrived as a busy part began: waits 3 s, then 0.3 s on flex
    assert row["p95_s"] == pytest.approx(2.8, abs=0.01)
    assert row["cost_ratio"] == pytest.approx(0.5)


def test_scarce_rows_are_gate_on_and_off_at_every_timeout_then_the_tuned() -> None:
    plan = Plan(scarce_tuned=({"gate_probe_max_s": 0.5},), scarce_sensitivity=(0.6,))
    labels = [(row.label, row.timeout_s, row.latency_flex_s, row.settings) for row in scarce.rows(plan)]
    assert labels == [
        ("gate on (defaults)", 600.0, 0.3, {}), ("gate on (defaults)", 60.0, 0.3, {}),
        ("gate off", 600.0, 0.3, {"flex_gate": "false"}), ("gate off", 60.0, 0.3, {"flex_gate": "false"}),
        ("tuned: FLEX_PROXY_GATE_PROBE_MAX_S=0.5", 600.0, 0.3, {"gate_probe_max_s": 0.5}),
        ("tuned: FLEX_PROXY_GATE_PROBE_MAX_S=0.5", 60.0, 0.3, {"gate_probe_max_s": 0.5}),
        ("gate on (defaults), flex answering in 0.6 s", 600.0, 0.6, {}),
    ]  # fmt: skip


GATE_METRICS = """flexproxy_gate_probes_total{model="o3",result="busy"} 16.0
flexproxy_gate_probes_total{model="o3",result="ok"} 3.0
flexproxy_gate_probes_total{model="o4-mini",result="ok"} 1.0
flexproxy_gate_transitions_total{model="o3",to="busy"} 3.0
flexproxy_cost_usd_total{endpoint="chat",model="o3",tier="flex"} 0.25
flexproxy_cost_usd_total{endpoint="chat",model="o3",tier="default"} 0.5
"""


def test_proxy_metrics_sum_costs_and_gate_counts_over_labels() -> None:
    got = scarce.proxy_metrics(GATE_METRICS)
    assert got["flexproxy_cost_usd_total"] == pytest.approx(0.75)
    assert got["gate_probes"] == {"busy": 16, "ok": 4}
    assert got["gate_transitions"] == {"busy": 3}


def _scarce_row(**changes: Any) -> dict[str, Any]:
    row = {"failures": 0, "flex_share": 0.99, "attempts_per_request": 1.2, "p95_s": 4.0}
    return {**row, **changes}


@pytest.mark.parametrize(
    ("changes", "met"),
    [({}, True), ({"failures": 1}, False), ({"flex_share": 0.989}, False), ({"attempts_per_request": 1.21}, False),
     ({"p95_s": 4.01}, False)],
)  # fmt: skip
def test_scarce_targets_are_issue_9s(changes: dict[str, Any], met: bool) -> None:
    assert report.meets_scarce(_scarce_row(**changes)) is met


def test_canned_answer_needs_no_nginx_escaping() -> None:
    assert json.loads(nginx.canned_answer_text())["object"] == "chat.completion"


def _numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [item for key, inner in value.items() for item in _numbers(inner, f"{path}.{key}")]
    if isinstance(value, list):
        return [item for i, inner in enumerate(value) for item in _numbers(inner, f"{path}[{i}]")]
    return []


@pytest.mark.timeout(170)
def test_quick_run_measures_every_scenario(tmp_path: Path) -> None:
    """`python -m bench --quick` end to end: every scenario gives finite figures, in well under 90 s."""
    nginx.binary(), wrk.binary()  # SystemExit naming the apt packages when missing: a failure, never a skip
    docs = tmp_path / "benchmarks.md"
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--results", str(tmp_path), "--docs", str(docs)],
        cwd=REPO, capture_output=True, text=True, timeout=160, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    assert elapsed < 90, f"the quick run took {elapsed:.0f} s"
    results = json.loads((tmp_path / "latest-quick.json").read_text())

    for scenario in ("overhead", "held", "bodies", "streams", "scarce"):
        numbers = _numbers(results[scenario])
        assert numbers, scenario
        bad = [path for path, value in numbers if not math.isfinite(value)]
        assert not bad, f"{scenario}: not finite at {bad}"

    overhead = results["overhead"]["targets"]
    for target in ("direct", "nginx", "flex-proxy", "flex-proxy gate off"):
        for level in ("c1", "c32"):
            figures = overhead[target][level]
            assert figures["requests_per_s"] > 0 and figures["p50_ms"] > 0, (target, level)
            assert figures["non_2xx"] == 0 and figures["socket_errors"] == 0, (target, level)
    assert results["overhead"]["proxy_headers"]["x-flex-requested-tier"] == "flex"

    held = results["held"]
    assert held["reached"] == held["target_requests"] == 1000
    assert held["result"]["proxy_peak_in_flight"] == 1000
    assert held["result"]["proxy_peak_rss_mb"] > held["result"]["proxy_rss_idle_mb"] > 0

    for size in ("1MB", "10MB"):
        assert results["bodies"]["sizes"][size]["flex-proxy"]["p50_ms"] > 0

    streams = results["streams"]
    assert streams["events_per_stream"] >= 200
    assert streams["flex-proxy"]["ttfe_p50_ms"] > 0

    scarce_rows = results["scarce"]["rows"]
    assert [(x["label"], x["timeout_s"]) for x in scarce_rows.values()] == [
        ("gate on (defaults)", 600.0), ("gate on (defaults)", 60.0), ("gate off", 600.0), ("gate off", 60.0)
    ]  # fmt: skip
    for name, figures in scarce_rows.items():
        # backoff-then-standard (the default) answers everything, on flex or on standard.
        assert figures["answered"] == figures["requests"] == 40 and figures["failures"] == 0, name
        assert figures["upstream"]["flex_429"] > 0 and figures["attempts_per_request"] > 1, name  # it met busy flex
        assert 0 < figures["cost_usd"] <= figures["all_standard_usd"], name
        assert figures["proxy_metrics"]["flexproxy_cost_usd_total"] == pytest.approx(figures["cost_usd"]), name
    gate_on = scarce_rows["gate on (defaults) | 600 s"]["proxy_metrics"]
    assert gate_on["gate_transitions"].get("busy", 0) >= 1 and sum(gate_on["gate_probes"].values()) >= 1
    assert scarce_rows["gate off | 600 s"]["proxy_metrics"]["gate_probes"] == {}
    assert results["scarce"]["perfect"]["attempts_per_request"] == 1.0
    overhead = results["overhead"]
    assert overhead["compare"]["flex-proxy"]["c32"]["rps_ratio_vs_gate_off"] > 0
    assert len(overhead["gate_pairs"]) == 2 and len(overhead["gate_ratios_c32"]) == 3
    assert 0 < overhead["gate_open_path_ns"] < 100_000 and overhead["gate_ratio_c32_median"] > 0
    assert 0 < overhead["gate_open_path_share_of_cpu"] < 1 and overhead["gate_ratio_c32_2se"] >= 0

    assert [row["target"] for row in results["verdicts"]] == [row["target"] for row in report.verdicts(results)]
    assert len(results["verdicts"]) == 8
    text = docs.read_text()
    again = tmp_path / "again.md"
    rendered = subprocess.run(
        [sys.executable, "-m", "bench", "--render", str(tmp_path / "latest-quick.json"), "--docs", str(again)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert again.read_text() == text  # the report is a pure function of the saved results
    for heading in ("## Machine", "## Targets", "## 1. Overhead", "## 2. Held", "## 3. Large", "## 4. Streams",
                    "## 5. Scarce", "perfect knowledge", "## Raising the open-files limit"):  # fmt: skip
        assert heading in text, heading
