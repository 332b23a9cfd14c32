"""The benchmark harness: its parsers, and one quick run of every scenario end to end (needs nginx and wrk)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import cli, fleet, flexreport, load, nginx, plan, redis_server, report, scarce, state_cost, wrk
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
    """The open loop: 300 arrivals at 10/s, flex busy 3 s of every 10 s, flex answering in 0.5 s."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 100}
    row = scarce.perfect(plan.OPEN_LOOP, usage)
    assert (row["requests"], row["answered"], row["failures"], row["waited"]) == (300, 300, 0, 90)
    assert (row["flex_share"], row["attempts_per_request"]) == (1.0, 1.0)
    assert row["p50_s"] == pytest.approx(0.5)
    assert row["max_s"] == pytest.approx(3.5)  # arrived as a busy part began: waits 3 s, then 0.5 s on flex
    assert row["p95_s"] == pytest.approx(3.0, abs=0.01)
    assert row["cost_ratio"] == pytest.approx(0.5)
    assert row["wall_s"] == pytest.approx(29.9 + 0.5)  # the last arrival, in a free part, answered at once


def test_perfect_sequential_client_waits_once_a_period() -> None:
    """One client, 100 requests one after another: each 10 s period holds one request that waits out the 3 s
    busy part and 13 that follow it at 0.5 s each, so 7 periods take 98 requests and the last two start at 70 s."""
    row = scarce.perfect(plan.SEQUENTIAL, {"prompt_tokens": 10})
    assert (row["requests"], row["waited"]) == (100, 8)
    assert row["wall_s"] == pytest.approx(74.0)
    assert (row["p50_s"], row["max_s"]) == (pytest.approx(0.5), pytest.approx(3.5))


def test_perfect_closed_loops_repeat_one_clients_timeline() -> None:
    """Four clients of 50: each waits in 4 periods (3 full periods of 14, then 8 more from 30 s)."""
    waits = scarce.ideal_waits(plan.FOUR_CLIENTS)
    assert len(waits) == 200 and waits[:50] * 4 == waits
    row = scarce.perfect(plan.FOUR_CLIENTS, {})
    assert (row["waited"], row["wall_s"]) == (16, pytest.approx(37.0))
    assert row["cost_ratio"] == 0.0  # no usage measured: no cost, and no division by zero


def test_perfect_long_busy_waits_out_twenty_seconds() -> None:
    row = scarce.perfect(plan.LONG_BUSY, {"prompt_tokens": 10})
    assert (row["requests"], row["waited"]) == (600, 400)  # arrivals in 0-20 s and 40-60 s
    assert row["max_s"] == pytest.approx(23.0)


def test_scarce_rows_are_gate_on_then_off_at_every_timeout() -> None:
    labels = [(row.label, row.timeout_s, row.settings) for row in scarce.rows(plan.OPEN_LOOP)]
    assert labels == [
        ("gate on (defaults)", 600.0, {}), ("gate on (defaults)", 60.0, {}),
        ("gate off", 600.0, {"flex_gate": "false"}), ("gate off", 60.0, {"flex_gate": "false"}),
    ]  # fmt: skip
    assert [(row.label, row.timeout_s) for row in scarce.rows(plan.LONG_BUSY)] == [
        ("gate on (defaults)", 60.0), ("gate off", 60.0)
    ]  # fmt: skip


def test_plans_hold_the_issues_workloads() -> None:
    full, quick = Plan.full(), Plan.quick_check()
    assert [w.name for w in full.workloads] == [w.name for w in quick.workloads] == list(plan.WORKLOAD_NAMES)
    seq, four, open_, long_ = full.workloads
    assert (seq.clients, seq.requests, seq.busy_period_s, seq.busy_for_s) == (1, 100, 10.0, 3.0)
    assert (seq.latency_flex_s, seq.latency_standard_s, seq.timeouts_s) == (0.5, 0.2, (600.0, 60.0))
    assert (four.clients, four.per_client) == (4, 50)
    assert (open_.clients, open_.requests, open_.rate_per_s, open_.latency_flex_s) == (0, 300, 10.0, 0.5)
    assert (long_.busy_period_s, long_.busy_for_s, long_.latency_flex_s, long_.latency_standard_s) == (40, 20, 3, 1)
    assert (long_.requests, long_.rate_per_s, long_.timeouts_s) == (600, 10.0, (60.0,))
    assert full.fleet_sizes == (1, 4, 8) and full.fleet_workloads == ("open-loop", "long-busy")
    only = replace(full, only_workloads=("long-busy",))
    assert [w.name for w in only.chosen(full.fleet_workloads)] == ["long-busy"]
    assert only.chosen(["sequential"]) == []


def test_closed_loops_are_bounded_well_past_their_ideal_length() -> None:
    ideal = scarce.perfect(plan.SEQUENTIAL, {})["wall_s"]
    assert load.closed_limit_s(plan.SEQUENTIAL) >= 2 * ideal + load.GRACE_S


GATE_METRICS = """flexproxy_gate_probes_total{model="o3",result="busy"} 16.0
flexproxy_gate_probes_total{model="o3",result="ok"} 3.0
flexproxy_gate_probes_total{model="o4-mini",result="ok"} 1.0
flexproxy_gate_transitions_total{model="o3",to="busy"} 3.0
flexproxy_cost_usd_total{endpoint="chat",model="o3",tier="flex"} 0.25
flexproxy_cost_usd_total{endpoint="chat",model="o3",tier="default"} 0.5
flexproxy_shared_state_up 1.0
"""


def test_proxy_metrics_sum_costs_and_gate_counts_over_labels_and_processes() -> None:
    got = scarce.proxy_metrics([GATE_METRICS])
    assert got["flexproxy_cost_usd_total"] == pytest.approx(0.75)
    assert got["gate_probes"] == {"busy": 16, "ok": 4}
    assert got["gate_transitions"] == {"busy": 3}
    fleet = scarce.proxy_metrics([GATE_METRICS, GATE_METRICS])
    assert fleet["flexproxy_cost_usd_total"] == pytest.approx(1.5)
    assert fleet["gate_probes"] == {"busy": 32, "ok": 8}


def test_shared_state_gauge_is_read_or_none() -> None:
    assert redis_server.shared_state_up(GATE_METRICS) == 1.0
    assert redis_server.shared_state_up("flexproxy_shared_state_up 0.0\n") == 0.0
    assert redis_server.shared_state_up("flexproxy_gate_busy{model=\"o3\"} 1.0\n") is None


def _scarce_row(**changes: Any) -> dict[str, Any]:
    row = {"failures": 0, "flex_share": 0.99, "attempts_per_request": 1.2, "p95_s": 4.0}
    return {**row, **changes}


@pytest.mark.parametrize(
    ("changes", "met"),
    [({}, True), ({"failures": 1}, False), ({"flex_share": 0.989}, False), ({"attempts_per_request": 1.21}, False),
     ({"p95_s": 4.01}, False)],
)  # fmt: skip
def test_open_loop_targets_are_issue_9s_and_14s(changes: dict[str, Any], met: bool) -> None:
    assert flexreport.meets("open-loop", _scarce_row(**changes)) is met


@pytest.mark.parametrize(
    ("workload", "changes", "met"),
    [("sequential", {"attempts_per_request": 1.5, "failures": 3, "p95_s": 60.0}, True),
     ("sequential", {"attempts_per_request": 1.51}, False),
     ("four-clients", {"attempts_per_request": 1.21}, False), ("four-clients", {"failures": 2}, True),
     ("long-busy", {"attempts_per_request": 1.3, "p95_s": 30.0}, True), ("long-busy", {"failures": 1}, False),
     ("long-busy", {"attempts_per_request": 1.31}, False), ("long-busy", {"flex_share": 0.98}, False)],
)  # fmt: skip
def test_issue_14_targets_by_workload(workload: str, changes: dict[str, Any], met: bool) -> None:
    assert flexreport.meets(workload, _scarce_row(**changes)) is met


def _fleet_row(processes: int, shared: bool, attempts: float, share: float = 1.0,
               up: list[float | None] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"processes": processes, "shared": shared, "attempts_per_request": attempts, "flex_share": share,
            "shared_state_up_after": up if up is not None else [1.0] * processes}  # fmt: skip


@pytest.mark.parametrize(
    ("big", "met"),
    [(_fleet_row(8, True, 1.21), True), (_fleet_row(8, True, 1.22), False),
     (_fleet_row(8, True, 1.0, share=0.985), False),
     (_fleet_row(8, True, 1.0, up=[1.0] * 7 + [0.0]), False),  # one proxy fell back to local mode
     (_fleet_row(8, True, 1.0, up=[None] * 8), False)],  # the proxies know no shared state at all
)  # fmt: skip
def test_fleet_target_is_against_one_process_without_redis(big: dict[str, Any], met: bool) -> None:
    rows = {"1 process, no Redis": _fleet_row(1, False, 1.1), "1 process, Redis": _fleet_row(1, True, 1.0),
            "8 processes, no Redis": _fleet_row(8, False, 2.4), "8 processes, Redis": big}  # fmt: skip
    verdicts = flexreport.fleet_verdicts({"workloads": {"open-loop": {"timeout_s": 600.0, "rows": rows}}})
    assert [v["met"] for v in verdicts] == [met]
    assert "8 proxy processes with Redis" in verdicts[0]["target"]
    assert verdicts[0]["value"] == pytest.approx(big["attempts_per_request"] / 1.1)


def test_fleet_rows_are_every_size_without_then_with_redis() -> None:
    assert [row.key for row in fleet.rows(replace(Plan.full(), fleet_sizes=(1, 8)))] == [
        "1 process, no Redis", "1 process, Redis", "8 processes, no Redis", "8 processes, Redis"
    ]  # fmt: skip


def _pair(local_cpu: float, shared_cpu: float) -> dict[str, dict[str, Any]]:
    def run(cpu: float) -> dict[str, Any]:
        return {"server_cpu_us_per_request": cpu, "requests_per_s": 1e6 / cpu, "non_2xx": 0,
                "redis_commands_per_request": 0.0, "redis_cpu_us_per_request": 0.0}  # fmt: skip

    return {"local": run(local_cpu), "shared": run(shared_cpu)}


@pytest.mark.parametrize(
    ("pairs", "up", "met"),
    [([(500, 510), (500, 505)], 1.0, True), ([(500, 520), (500, 515)], 1.0, False),
     ([(500, 500), (500, 500)], 0.0, False), ([(500, 500), (500, 500)], None, False)],
)  # fmt: skip
def test_open_path_with_redis_is_judged_on_paired_cpu_a_request(
    pairs: list[tuple[float, float]], up: float | None, met: bool
) -> None:
    summary = state_cost.summarize([_pair(a, b) for a, b in pairs], up, 1.0)
    assert summary["cpu_ratios"] == pytest.approx([b / a for a, b in pairs])
    assert flexreport.state_cost_met(summary) is met
    verdicts = flexreport.fleet_verdicts({"workloads": {}, "open_path": summary})
    assert [v["met"] for v in verdicts] == [met]


def test_redis_replies_are_complete_only_when_whole() -> None:
    assert redis_server._complete(b"+PONG\r\n")
    assert not redis_server._complete(b"+PO")
    assert not redis_server._complete(b"$10\r\nabc\r\n")
    assert redis_server._complete(b"$3\r\nabc\r\n")
    assert redis_server._complete(b"$-1\r\n")


def test_throwaway_redis_counts_commands_and_forgets_everything(tmp_path: Path) -> None:
    """A real redis-server as the fleet scenario starts it: loopback, a free port, no persistence."""
    redis_server.binary()  # SystemExit naming the package when missing: a failure, never a skip
    assert re.fullmatch(r"\d+\.\d+\.\d+", redis_server.version())
    with redis_server.server(tmp_path, "redis-test") as redis:
        assert redis_server.ping(redis.port)
        before = redis_server.commands_processed(redis.port)
        assert redis_server.command(redis.port, "SET", "k", "v").startswith(b"+OK")
        assert redis_server.commands_processed(redis.port) - before == 2  # the SET and the first INFO
        config = redis_server.command(redis.port, "CONFIG", "GET", "save").decode()
        assert "save" in config and redis_server.info(redis.port, "persistence")["aof_enabled"] == "0"
    assert not redis_server.ping(redis.port)
    assert not list(tmp_path.glob("*.rdb"))


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


@pytest.mark.timeout(330)
@pytest.mark.needs("nginx", "wrk", "redis-server")
def test_quick_run_measures_every_scenario(tmp_path: Path) -> None:
    """`python -m bench --quick` end to end: every scenario gives finite figures, in a few minutes at most."""
    docs = tmp_path / "benchmarks.md"
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--results", str(tmp_path), "--docs", str(docs)],
        cwd=REPO, capture_output=True, text=True, timeout=320, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    assert elapsed < 240, f"the quick run took {elapsed:.0f} s"
    results = json.loads((tmp_path / "latest-quick.json").read_text())

    for scenario in ("overhead", "held", "bodies", "streams", "scarce", "fleet"):
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

    workloads = results["scarce"]["workloads"]
    assert list(workloads) == list(plan.WORKLOAD_NAMES)
    for name, workload in workloads.items():
        assert [(x["label"], x["timeout_s"]) for x in workload["rows"].values()] == [
            (label, timeout) for label in ("gate on (defaults)", "gate off") for timeout in workload["timeouts_s"]
        ], name  # fmt: skip
        for key, figures in workload["rows"].items():
            # backoff-then-standard (the default) answers everything, on flex or on standard.
            assert figures["answered"] == figures["requests"] == workload["requests"], (name, key)
            assert figures["failures"] == 0 and figures["upstream"]["flex_429"] > 0, (name, key)  # it met busy flex
            assert figures["attempts_per_request"] > 1, (name, key)
            assert 0 < figures["cost_usd"] <= figures["all_standard_usd"], (name, key)
            assert figures["proxy_metrics"]["flexproxy_cost_usd_total"] == pytest.approx(figures["cost_usd"]), key
        gate_on = next(iter(workload["rows"].values()))["proxy_metrics"]
        assert gate_on["gate_transitions"].get("busy", 0) >= 1 and sum(gate_on["gate_probes"].values()) >= 1, name
        assert workload["rows"]["gate off | 600 s" if name != "long-busy" else "gate off | 60 s"]["proxy_metrics"][
            "gate_probes"] == {}, name  # fmt: skip
        assert workload["perfect"]["attempts_per_request"] == 1.0 and workload["perfect"]["requests"] == len(
            scarce.ideal_waits(Plan.quick_check().workload(name)))  # fmt: skip
    # Closed loops really are closed: one client's requests never overlap, so the load lasts at least their sum.
    sequential = workloads["sequential"]["rows"]["gate on (defaults) | 600 s"]
    assert sequential["wall_s"] >= sequential["requests"] * workloads["sequential"]["latency_flex_s"]

    fleet_results = results["fleet"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", fleet_results["redis_version"])
    for name in ("open-loop", "long-busy"):
        rows = fleet_results["workloads"][name]["rows"]
        assert list(rows) == ["1 process, no Redis", "1 process, Redis", "2 processes, no Redis",
                              "2 processes, Redis"], name  # fmt: skip
        for key, figures in rows.items():
            assert figures["answered"] == figures["requests"] and figures["upstream"]["flex_429"] > 0, (name, key)
            assert len(figures["shared_state_up_after"]) == figures["processes"], (name, key)
            assert figures["proxy_metrics"]["flexproxy_cost_usd_total"] == pytest.approx(figures["cost_usd"]), key
        # Both proxies of a two-process row served (round-robin): each one's gate saw the busy flex.
        two = rows["2 processes, no Redis"]["proxy_metrics"]
        assert sum(two["gate_probes"].values()) >= 2
    open_path = fleet_results["open_path"]
    assert len(open_path["cpu_ratios"]) == 2 and open_path["non_2xx"] == 0
    assert open_path["local_cpu_us_per_request"] > 0 and open_path["shared_cpu_us_per_request"] > 0

    overhead = results["overhead"]
    assert overhead["compare"]["flex-proxy"]["c32"]["rps_ratio_vs_gate_off"] > 0
    assert len(overhead["gate_pairs"]) == 2 and len(overhead["gate_ratios_c32"]) == 3
    assert 0 < overhead["gate_open_path_ns"] < 100_000 and overhead["gate_ratio_c32_median"] > 0
    assert 0 < overhead["gate_open_path_share_of_cpu"] < 1 and overhead["gate_ratio_c32_2se"] >= 0

    assert [row["target"] for row in results["verdicts"]] == [row["target"] for row in report.verdicts(results)]
    # 4 overhead (share of nginx, added p50, CPU a request, the gate), held, bodies, streams; sequential, four
    # clients, open loop (issues 14 and 9), long busy; the fleet on two workloads and its open path.
    assert len(results["verdicts"]) == 4 + 1 + 1 + 1 + (1 + 1 + 2 + 1) + 3
    share = next(row for row in results["verdicts"] if "nginx proxy_pass" in row["target"])
    assert share["value"] == overhead["compare"]["flex-proxy"]["c32"]["rps_ratio_vs_nginx"]
    text = docs.read_text()
    again = tmp_path / "again.md"
    rendered = subprocess.run(
        [sys.executable, "-m", "bench", "--render", str(tmp_path / "latest-quick.json"), "--docs", str(again)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert again.read_text() == text  # the report is a pure function of the saved results
    for heading in ("## Machine", "## Targets", "## 1. Overhead", "## 2. Held", "## 3. Large", "## 4. Streams",
                    "## 5. Scarce", "### 5.1 Sequential batch script", "### 5.4 Long busy spells",
                    "perfect knowledge", "## 6. A fleet", "### 6.2 Long busy spells across a fleet",
                    "### The open path with Redis configured", "## Raising the open-files limit"):  # fmt: skip
        assert heading in text, heading


def test_only_and_workload_choose_a_family_or_one_workload() -> None:
    args = cli._parser().parse_args(["--only", "scarce", "--only", "fleet", "--workload", "long-busy"])
    assert (args.only, args.workload) == (["scarce", "fleet"], ["long-busy"])
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["--workload", "no-such-workload"])


@pytest.mark.parametrize(
    ("text", "sizes"), [("1,4,8", (1, 4, 8)), ("8,1,8", (1, 8)), ("32", (32,)), ("0,2", None), ("33", None),
                        ("", None), ("two", None), ("1.5", None)],
)  # fmt: skip
def test_fleet_sizes_are_whole_counts_within_bounds(text: str, sizes: tuple[int, ...] | None) -> None:
    if sizes is None:
        with pytest.raises(SystemExit):
            cli._parser().parse_args(["--fleet-sizes", text])
    else:
        assert cli._parser().parse_args(["--fleet-sizes", text]).fleet_sizes == sizes
