"""The savings page in a real browser: Debian's Chromium driven by Playwright (never a downloaded browser), against
the proxy in front of the simulator. The figures it shows equal /flex/savings and /metrics; /docs renders offline."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ProxyServer
from traffic import SETTINGS, nano_by, send

from proxy.sim import Simulator

CHROMIUM = Path(os.environ.get("FLEX_PROXY_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
WAIT_MS = 15_000

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (bash .ci/run installs Debian's chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, timeout=60_000)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    # Nothing but the proxy on loopback: a page that needed a CDN would stay blank.
    context.route(re.compile(r"^(?!http://127\.0\.0\.1:).*"), lambda route: route.abort())
    yield opened
    context.close()
    assert errors == [], errors


def shown_usd(text: str) -> float:
    return float(text.replace("$", "").replace(",", ""))


def shown_matches(text: str, value: float, kind: str) -> bool:
    """The text is the value as the page rounds it: whole cents from $1, three significant digits below."""
    if kind == "int":
        return int(text.replace(",", "")) == value
    if kind == "share":
        return text == f"{value * 100:.1f}%"
    shown = shown_usd(text)
    return abs(shown - value) <= (0.005 if abs(value) >= 1 else abs(value) * 0.005 + 1e-12)


def test_the_page_shows_what_the_ledger_and_the_counters_say(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, page: Any, tmp_path: Path
) -> None:
    proxy = make_proxy(**SETTINGS)
    send(proxy, sim)
    page.goto(proxy.url + "/")
    page.wait_for_selector("body[data-loaded]", state="attached")
    data = httpx.get(proxy.url + "/flex/savings").json()
    text = proxy.metrics()
    today = data["today"]["totals"]
    assert today["saved_nusd"] == nano_by(text, "flexproxy_cost_saved_usd_total")[""] > 0
    assert today["lost_nusd"] == nano_by(text, "flexproxy_savings_lost_usd_total")[""] > 0
    cards = page.locator("[data-key]")
    assert cards.count() == 10
    for n in range(cards.count()):
        card = cards.nth(n)
        key = card.get_attribute("data-key").split(".")[1]
        kind = card.get_attribute("data-format") or "usd"
        assert card.get_attribute("data-value") == str(today[key]), key
        assert shown_matches(card.inner_text(), today[key], kind), (key, card.inner_text(), today[key])
    assert page.locator('[data-key="today.saved_usd"]').inner_text() == "$0.0105"  # 3 x $0.003502 on flex
    assert page.locator('[data-key="today.flex_share"]').inner_text() == "80.0%"  # 4 of the 5 sent on flex
    for table, key, rows in (("client", "by_client", data["period"]["by_client"]),
                             ("model", "by_model", data["period"]["by_model"])):  # fmt: skip
        shown = page.locator(f'table[data-table="{table}"] tbody tr')
        assert shown.count() == len(rows)
        for n, row in enumerate(rows):  # same order: most saved first
            line = shown.nth(n)
            assert line.get_attribute("data-row") == row[table]
            for column in ("requests", "cost_usd", "saved_usd", "savings_lost_usd", "fallbacks", "unread"):
                cell = line.locator(f'td[data-col="{column}"]')
                assert float(cell.get_attribute("data-value")) == row[column], (row[table], column)
                kind = "int" if column in ("requests", "fallbacks", "unread") else "usd"
                assert shown_matches(cell.inner_text(), row[column], kind), (row[table], column, cell.inner_text())
        total = page.locator(f'table[data-table="{table}"] tfoot td[data-col="saved_usd"]')
        assert float(total.get_attribute("data-value")) == nano_by(text, "flexproxy_cost_saved_usd_total")[""] / 1e9
        assert key in data["period"]
    bars = page.locator(f'#chart g[data-day="{data["today"]["last_day"]}"] rect')
    assert bars.count() == 3  # spent, of which lost, saved
    assert page.locator("#chart g[data-day]").count() == 7
    assert "This process since" in page.locator("#scope").inner_text()
    assert page.locator('table[data-table="gates"] tr[data-row="o3"]').count() == 1
    page.screenshot(path=str(tmp_path / "savings.png"), full_page=True)
    assert (tmp_path / "savings.png").stat().st_size > 10_000

    page.locator("#days").select_option("14")  # another span: the page asks again and redraws
    page.locator("#chart g[data-day]").nth(13).wait_for(state="attached")  # (the page's CSP forbids eval)
    page.locator('.toggle[data-for="client"] input[value="today"]').check()
    assert page.locator('table[data-table="client"] tbody tr').count() == len(data["today"]["by_client"])


def test_a_quiet_proxy_says_so(proxy: ProxyServer, page: Any) -> None:
    page.goto(proxy.url + "/")
    page.wait_for_selector("body[data-loaded]", state="attached")
    assert page.locator('[data-key="today.saved_usd"]').inner_text() == "$0"
    assert page.locator('[data-key="today.flex_share"]').inner_text() == "\N{EN DASH}"
    assert "No priced answers" in page.locator("#chart").inner_html()
    assert "No model requests" in page.locator("#by-client").inner_text()


def test_a_browser_logs_in_where_loopback_is_not_trusted(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, page: Any
) -> None:
    proxy = make_proxy(admin_key="adm-browser-key", loopback_admin=False)
    page.goto(proxy.url + "/")
    assert page.url.endswith("/login?next=%2F")
    page.fill("#key", "adm-wrong")
    page.click("button[type=submit]")
    assert "not the admin key" in page.locator(".message").inner_text()
    page.fill("#key", "adm-browser-key")
    page.click("button[type=submit]")
    page.wait_for_selector("body[data-loaded]", state="attached")
    assert page.url == proxy.url + "/"
    cookies = page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [("flex_proxy_admin", True, "Strict")]
    assert "adm-browser-key" not in cookies[0]["value"]
    page.click("button.link")  # log out
    page.wait_for_url(re.compile(r".*/login$"))
    assert page.context.cookies() == []


def test_docs_render_with_no_network(proxy: ProxyServer, page: Any) -> None:
    page.goto(proxy.url + "/docs")
    page.wait_for_selector("text=flex-proxy control plane")
    page.get_by_text("/flex/savings", exact=True).first.wait_for()
    page.get_by_text("/v1/chat/completions", exact=True).first.wait_for()
