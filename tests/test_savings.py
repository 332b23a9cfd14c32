"""/flex/savings: today and recent UTC days from the ledger, whose totals equal the Prometheus counters exactly."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import ProxyServer
from traffic import MESSAGES, O3_FLEX_NUSD, O3_STANDARD_NUSD, SETTINGS, USAGE, count, nano_by, send

from proxy.config import Settings
from proxy.sim import Reply, SimServer, Simulator

MODEL_ENDPOINTS = ("chat", "responses", "compact")
FIGURES = ("requests", "answered", "flex_sent", "served_flex", "fallbacks", "unread", "cost_nusd", "saved_nusd")


def savings(proxy: ProxyServer, **params: Any) -> dict[str, Any]:
    answer = httpx.get(proxy.url + "/flex/savings", params=params)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_totals_equal_the_prometheus_counters(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    proxy = make_proxy(**SETTINGS)
    send(proxy, sim)
    data, text = savings(proxy), proxy.metrics()
    totals = data["today"]["totals"]
    assert totals["cost_nusd"] == nano_by(text, "flexproxy_cost_usd_total")[""]
    assert totals["saved_nusd"] == nano_by(text, "flexproxy_cost_saved_usd_total")[""]
    assert totals["lost_nusd"] == nano_by(text, "flexproxy_savings_lost_usd_total")[""]
    assert totals["fallbacks"] == count(text, "flexproxy_fallbacks_total") == 1
    assert totals["unread"] == count(text, "flexproxy_unread_answers_total") == 1
    requests = sum(count(text, "flexproxy_requests_total", endpoint=e) for e in MODEL_ENDPOINTS)
    assert totals["requests"] == requests == 8
    assert totals["answered"] == count(text, "flexproxy_requests_total", outcome="ok") == 6
    sent = count(text, "flexproxy_requests_total", requested_tier="flex", outcome="ok")
    served = count(text, "flexproxy_requests_total", requested_tier="flex", outcome="ok", served_tier="flex")
    assert (totals["flex_sent"], totals["served_flex"], totals["flex_share"]) == (sent, served, served / sent)
    assert (sent, served) == (5, 4)
    for label, key in (("client", "by_client"), ("model", "by_model")):
        rows = {row[label]: row for row in data["today"][key]}
        for metric, field in (
            ("flexproxy_cost_usd_total", "cost_nusd"), ("flexproxy_cost_saved_usd_total", "saved_nusd"),
            ("flexproxy_savings_lost_usd_total", "lost_nusd"),
        ):  # fmt: skip
            shown = {name: n for name, n in nano_by(text, metric, label).items() if n}
            assert {name: row[field] for name, row in rows.items() if row[field]} == shown, (label, field)
    web = {row["client"]: row for row in data["today"]["by_client"]}["web"]
    assert web["saved_nusd"] == 3 * O3_FLEX_NUSD and web["lost_nusd"] == O3_STANDARD_NUSD - O3_FLEX_NUSD
    assert web["cost_nusd"] == 3 * O3_FLEX_NUSD + O3_STANDARD_NUSD
    assert web["saved_usd"] == 0.010506 and web["savings_lost_usd"] == 0.003502  # exact, as /metrics shows them
    # none: the 401, refused before any client key was accepted (a name no client may take)
    assert {row["client"] for row in data["today"]["by_client"]} == {"web", "batch", "none"}
    assert data["today"]["by_client"][0]["client"] == "web"  # most saved first


def test_today_the_period_and_the_days(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    proxy = make_proxy(**SETTINGS)
    send(proxy, sim)
    data = savings(proxy)
    assert data["scope"] == "process" and data["scope_note"].startswith("this process since ")
    assert data["mode"] == "flex" and data["shadow_saved_usd"] is None
    assert len(data["daily"]) == 7
    assert data["daily"][0]["day"] == data["today"]["last_day"] == data["period"]["last_day"]
    assert data["period"]["first_day"] == data["daily"][-1]["day"]
    assert data["period"]["totals"] == data["today"]["totals"]  # nothing before today: the process is new
    daily = {k: v for k, v in data["daily"][0].items() if k != "day"}
    assert daily == data["today"]["totals"]
    assert all(day["requests"] == 0 and day["flex_share"] is None for day in data["daily"][1:])
    assert {g["family"] for g in data["gates"]["families"]} >= {"o3"} and data["gates"]["gate_enabled"] is False
    assert [len(savings(proxy, days=n)["daily"]) for n in (1, 14, 31)] == [1, 14, 31]


@pytest.mark.parametrize("days", ["0", "32", "-1", "seven", "1.5"])
def test_days_out_of_bounds_is_a_clear_400(proxy: ProxyServer, days: str) -> None:
    answer = httpx.get(proxy.url + "/flex/savings", params={"days": days})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "days") and "days" in error["message"]


class Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked(sim_server: SimServer, sim: Simulator) -> Iterator[tuple[ProxyServer, Wall]]:
    wall = Wall(1_796_601_600.0 - 5)  # 5 s before midnight UTC, 2026-12-07
    server = ProxyServer(Settings(upstream_base_url=sim_server.base_url), wall=wall).start()
    yield server, wall
    server.stop()


def test_requests_count_on_their_utc_day(clocked: tuple[ProxyServer, Wall], sim: Simulator) -> None:
    proxy, wall = clocked
    client = proxy.client()
    sim.script(Reply(usage=USAGE))
    client.chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    wall.now += 10  # past midnight
    for _ in range(2):
        sim.script(Reply(usage=USAGE))
        client.chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    data = savings(proxy, days=2)
    assert [(d["day"], d["requests"], d["saved_nusd"]) for d in data["daily"]] == [
        ("2026-12-07", 2, 2 * O3_FLEX_NUSD), ("2026-12-06", 1, O3_FLEX_NUSD),
    ]  # fmt: skip
    assert data["today"]["totals"]["saved_nusd"] == 2 * O3_FLEX_NUSD
    assert data["period"]["totals"]["saved_nusd"] == 3 * O3_FLEX_NUSD == nano_by(
        proxy.metrics(), "flexproxy_cost_saved_usd_total"
    )[""]
    assert data["generated"].startswith("2026-12-07T00:00:05") and data["started"].startswith("2026-12-06T23:59:55")


def test_shadow_mode_shows_what_flex_would_have_saved(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    proxy = make_proxy(mode="shadow")
    sim.script(Reply(usage=USAGE))
    proxy.client().chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    data = savings(proxy)
    while data["today"]["totals"]["requests"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # the answer reached the client a moment before its accounting
        data = savings(proxy)
    assert data["mode"] == "shadow"
    shadow = nano_by(proxy.metrics(), "flexproxy_shadow_savings_usd_total")[""]
    assert shadow == O3_STANDARD_NUSD - O3_FLEX_NUSD and data["shadow_saved_usd"] == shadow / 1e9
    assert data["today"]["totals"]["saved_nusd"] == 0 and data["today"]["totals"]["cost_nusd"] == O3_STANDARD_NUSD
