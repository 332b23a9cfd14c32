"""`flex-proxy report`: the installed command against a real proxy, as a table and as JSON, and its one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import ProxyServer
from traffic import SETTINGS, nano_by, send

from proxy.report import usd
from proxy.sim import Simulator

BIN = Path(sys.executable).parent / "flex-proxy"
ADMIN = "adm-report-0123"


def report(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLEX_PROXY_")}
    if key is not None:
        env["FLEX_PROXY_ADMIN_KEY"] = key
    return subprocess.run(
        [str(BIN), "report", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1 and result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flex-proxy report: "), result.stderr
    return lines[0]


def test_the_table_shows_the_figures_of_flex_savings(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    proxy = make_proxy(**SETTINGS)
    send(proxy, sim)
    result = report("--url", proxy.base_url)  # an OpenAI base URL works too: /v1 is taken off
    assert result.returncode == 0, result.stderr
    out = result.stdout
    data = httpx.get(proxy.url + "/flex/savings").json()
    today = data["today"]["totals"]
    saved = nano_by(proxy.metrics(), "flexproxy_cost_saved_usd_total")[""]
    assert today["saved_nusd"] == saved
    assert f"saved {usd(saved / 1e9)}, spent {usd(today['cost_usd'])}" in out
    assert "flex share 80.0% (4 of 5), 1 fallback, 1 unread" in out
    assert f"flex-proxy at {proxy.url}: this process since" in out
    lines = out.splitlines()
    web = next(line for line in lines if line.startswith("web "))
    assert web.split() == ["web", "5", "4", "75.0%", "$0.0175", "$0.0105", "$0.0035", "1", "1"]
    assert any(line.split()[:1] == ["gpt-4.1"] for line in lines)  # by model
    assert next(line for line in lines if line.startswith("day ")).split()[0] == "day"
    assert len([line for line in lines if line[:4].isdigit()]) == 7  # one row a day, --days 7 by default
    assert lines[-1] == "flex gates: off (FLEX_PROXY_FLEX_GATE=false)"


def test_json_is_the_answer_of_flex_savings(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    proxy = make_proxy(**SETTINGS)
    send(proxy, sim)
    result = report("--url", proxy.url, "--json", "--days", "3")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    fetched = httpx.get(proxy.url + "/flex/savings", params={"days": 3}).json()
    for answer in (printed, fetched):
        answer.pop("generated")
        for family in answer["gates"]["families"]:
            family.pop("flex_429_rate")  # a rate over a sliding window: it moves between the two reads
    assert printed == fetched and len(printed["daily"]) == 3


def test_the_admin_key_comes_from_the_environment(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    proxy = make_proxy(admin_key=ADMIN, loopback_admin=False)  # loopback must show the key too, as from afar
    assert report("--url", proxy.url, key=ADMIN).returncode == 0
    missing = one_line_error(report("--url", proxy.url))
    assert "asks for the admin key: set FLEX_PROXY_ADMIN_KEY" in missing
    wrong = one_line_error(report("--url", proxy.url, key="adm-wrong"))
    assert "refused the admin key in FLEX_PROXY_ADMIN_KEY (401)" in wrong and "adm-wrong" not in wrong


def test_a_proxy_without_an_admin_key_says_where_to_run_it(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:  # noqa: E501
    proxy = make_proxy(loopback_admin=False)
    closed = one_line_error(report("--url", proxy.url, key=ADMIN))
    assert "has no admin key set" in closed and "kubectl port-forward" in closed


def test_unreachable_and_wrong_addresses_are_one_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        refused = one_line_error(report("--url", f"http://127.0.0.1:{port}"))
    assert refused == f"flex-proxy report: cannot reach http://127.0.0.1:{port}: connection refused"
    assert "must be an http:// or https:// address" in one_line_error(report("--url", "127.0.0.1:8080"))


def test_not_a_proxy_is_one_line(sim_server) -> None:  # type: ignore[no-untyped-def]
    # The simulator answers /flex/savings with a 404 of its own: not a flex-proxy.
    assert "has no /flex/savings" in one_line_error(report("--url", sim_server.base_url.removesuffix("/v1")))


@pytest.mark.parametrize("days", ["0", "32", "x"])
def test_days_out_of_bounds_is_refused(days: str) -> None:
    result = report("--days", days)
    assert result.returncode == 2 and "--days" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.0, "$0"), (0.002, "$0.002"), (0.0105060, "$0.0105"), (0.000022125, "$0.0000221"), (1.0, "$1.00"),
        (12.345, "$12.35"), (1234.5, "$1,234.50"), (1e-9, "$0.000000001"), (-0.5, "-$0.5"), (-0.002, "-$0.002"),
        (float("nan"), "-"),
    ],
)  # fmt: skip
def test_usd(value: float, shown: str) -> None:
    assert usd(value) == shown
