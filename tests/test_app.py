"""The app: /v1/... to the proxy pipeline, everything else to the FastAPI control plane (probes, metrics, the
flex gates, prices and policies in force), its OpenAPI schema, its admin key beyond loopback, and its 404s."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import ProxyServer
from prometheus_client import CollectorRegistry, Gauge

from proxy.app import FlexProxy, create_app, sample_loop_lag
from proxy.config import Settings
from proxy.sim import Reply, Simulator

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "hi"}]
CONTROL = ("/", "/flex/savings", "/flex/status", "/flex/prices", "/flex/policies", "/docs", "/openapi.json")


def poll(read: Callable[[], Any], until: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """Read until `until` holds of what was read; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if until(value):
            return value
        assert time.monotonic() < deadline, f"still {value!r} after {timeout} s"
        time.sleep(0.02)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def test_docs_and_openapi_describe_the_control_plane(proxy: ProxyServer) -> None:
    docs = httpx.get(proxy.url + "/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in docs.text and "/openapi.json" in docs.text
    schema = httpx.get(proxy.url + "/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {
        "/healthz", "/readyz", "/metrics", "/flex/savings", "/flex/status", "/flex/prices", "/flex/policies",
        "/v1/chat/completions", "/v1/responses",
    }  # fmt: skip
    models = {"/healthz": "Health", "/readyz": "Readiness", "/flex/status": "FlexStatus", "/flex/prices": "Prices"}
    models |= {"/flex/policies": "Policies", "/flex/savings": "Savings"}
    assert {"Policy", "Rule", "ClientOut"} <= set(schema["components"]["schemas"])
    for path, model in models.items():
        content = paths[path]["get"]["responses"]["200"]["content"]["application/json"]
        assert content["schema"]["$ref"] == f"#/components/schemas/{model}", path
    assert "text/plain; version=1.0.0; charset=utf-8" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert paths["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Readiness"
    )
    components = schema["components"]["schemas"]
    assert {"families", "gate_enabled"} <= set(components["FlexStatus"]["properties"])
    assert {"state", "waiting", "in_flight", "next_probe_in_s"} <= set(components["GateStatus"]["properties"])
    assert components["ErrorEnvelope"]["properties"]["error"]["$ref"].endswith("/ErrorDetail")
    assert "Bearer" in str(schema["components"]["securitySchemes"])
    assert {"today", "period", "daily", "gates", "scope"} <= set(components["Savings"]["properties"])
    assert components["Savings"]["properties"]["gates"]["$ref"].endswith("/FlexStatus")
    days = paths["/flex/savings"]["get"]["parameters"][0]
    assert (days["name"], days["schema"]["minimum"], days["schema"]["maximum"]) == ("days", 1, 31)


def test_openapi_lists_the_mirrored_v1_endpoints_with_their_headers(proxy: ProxyServer) -> None:
    paths = httpx.get(proxy.url + "/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/responses"):
        operation = paths[path]["post"]
        sent = {p["name"]: p for p in operation["parameters"]}
        assert set(sent) == {"X-Flex-Tier", "X-Flex-On-Unavailable", "X-Flex-Deadline-S", "X-Flex-Policy"}, path
        assert sent["X-Flex-Tier"]["schema"]["enum"] == ["off", "flex"] and sent["X-Flex-Tier"]["in"] == "header"
        assert "backoff-then-standard" in sent["X-Flex-On-Unavailable"]["schema"]["enum"]
        answered = operation["responses"]["200"]
        assert set(answered["headers"]) == {
            "X-Flex-Attempts", "X-Flex-Requested-Tier", "X-Flex-Served-Tier", "X-Flex-Cost-USD", "X-Flex-Saved-USD",
        }  # fmt: skip
        assert "text/event-stream" in answered["content"] and "x-flex-cost-usd=" in operation["description"]
        assert operation["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorEnvelope"
        )


def test_healthz_answers_get_and_head_and_the_container_probe(proxy: ProxyServer) -> None:
    response = httpx.get(proxy.url + "/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    head = httpx.head(proxy.url + "/healthz")
    assert (head.status_code, head.content) == (200, b"")
    probe = [sys.executable, str(REPO / "deploy/docker/healthcheck.py"), proxy.url + "/healthz"]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def test_readyz_is_503_while_draining(proxy: ProxyServer) -> None:
    ready = httpx.get(proxy.url + "/readyz")
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "upstream_started": True, "draining": False})
    proxy.app.services.draining = True
    draining = httpx.get(proxy.url + "/readyz")
    assert (draining.status_code, draining.json()["draining"]) == (503, True)
    assert httpx.get(proxy.url + "/healthz").status_code == 200  # still alive: only not taking new traffic
    proxy.app.services.draining = False
    assert httpx.get(proxy.url + "/readyz").status_code == 200


async def test_readyz_is_503_until_the_upstream_client_starts() -> None:
    app = create_app(Settings(upstream_base_url="http://127.0.0.1:9"))  # the lifespan has not run
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
        response = await client.get("/readyz")
    assert (response.status_code, response.json()["upstream_started"]) == (503, False)


def test_flex_status_shows_a_gate_going_busy_then_open(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    # Probes at least 0.5 s apart, so the busy gate lasts long enough to be seen from outside.
    proxy = make_proxy(gate_probe_initial_s=1.0, gate_probe_max_s=1.0)
    sim.script(Reply(kind="flex_429"))  # then successes
    answers: list[Any] = []
    call = threading.Thread(
        target=lambda: answers.append(proxy.client(timeout=30).chat.completions.create(model="o3", messages=MESSAGES))
    )

    def o3() -> dict[str, Any] | None:
        families = httpx.get(proxy.url + "/flex/status").json()["families"]
        return next((f for f in families if f["family"] == "o3"), None)

    call.start()
    try:
        busy = poll(o3, lambda f: f is not None and f["gates"][0]["state"] == "busy")
        gate = busy["gates"][0]
        assert gate["key"] == "o3" and gate["waiting"] == 1 and gate["in_flight"] == 0
        assert 0 <= gate["next_probe_in_s"] <= 1.0
        assert busy["flex_429_rate"] == 1.0
        assert busy["standard_reserve_s"] == 15.0 and busy["standard_p95_s"] is None
        opened = poll(o3, lambda f: f["gates"][0]["state"] == "open" and f["gates"][0]["in_flight"] == 0)
    finally:
        call.join(30)
    assert answers and answers[0].service_tier == "flex"
    assert opened["gates"][0] == {"key": "o3", "state": "open", "waiting": 0, "in_flight": 0, "next_probe_in_s": None}
    assert opened["flex_429_rate"] == 0.5  # one 429, then the probe answered
    assert proxy.metric("flexproxy_gate_transitions_total", model="o3", to="open") == 1
    today = httpx.get(proxy.url + "/flex/status").json()["today"]  # and the money, as /flex/savings has it
    assert (today["answered"], today["served_flex"], today["flex_share"]) == (1, 1, 1.0)
    assert today["saved_usd"] > 0
    assert today["saved_usd"] == pytest.approx(proxy.metric("flexproxy_cost_saved_usd_total"))


def test_prices_are_the_table_in_force(proxy: ProxyServer) -> None:
    prices = httpx.get(proxy.url + "/flex/prices").json()
    assert prices["unit"] == "USD per 1M tokens" and prices["override_file"] is None
    o3 = next(m for m in prices["models"] if m["family"] == "o3")
    assert o3["standard"] == {"input": 2.0, "cached_input": 0.5, "output": 8.0, "cache_write": None}
    assert o3["flex"] == {"input": 1.0, "cached_input": 0.25, "output": 4.0, "cache_write": None}
    gpt41 = next(m for m in prices["models"] if m["family"] == "gpt-4.1")
    assert gpt41["flex"] is None  # no flex tier, so nothing to save on it


def test_policies_show_the_strategy_in_force(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy(on_unavailable="fail", max_flex_attempts=3, flex_budget_s=42, flex_models="o3,o4-mini")
    policies = httpx.get(proxy.url + "/flex/policies").json()
    strategy = policies["strategy"]
    assert (strategy["on_unavailable"], strategy["max_flex_attempts"], strategy["flex_budget_s"]) == ("fail", 3, 42)
    assert policies["timeouts"]["upstream_timeout_s"] == 900.0
    assert policies["gate"] == {
        "enabled": True, "scope": "model", "probe_initial_s": 0.01, "probe_max_s": 0.05, "max_waiting": 10_000,
        "max_in_flight": 0,
    }  # fmt: skip
    assert policies["flex_models"] == ["o3", "o4-mini"]


POLICY_FILE = """
default = "batch"

[policies.batch]
strategy = "backoff-then-standard"
flex_budget_s = 1800

[policies.interactive]
flex = false

[clients.team-a]
policy_header = true
standard_spend_cap_usd = 20.0

[[rules]]
client = "team-b"
policy = "interactive"
"""


def test_policies_show_the_named_policies_rules_and_clients(make_proxy, sim: Simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policies.toml"
    path.write_text(POLICY_FILE)
    proxy = make_proxy(
        api_key="sk-proxy-secret", client_keys="team-a team-a-secret,team-b team-b-secret", policy_file=str(path),
        flex_gate=False,  # the request's own four flex attempts, then the fallback
    )
    sim.script(Reply(kind="flex_429"), Reply(kind="flex_429"), Reply(kind="flex_429"), Reply(kind="flex_429"))
    proxy.client(api_key="team-a-secret").chat.completions.create(model="o3", messages=MESSAGES)  # falls back
    policies = httpx.get(proxy.url + "/flex/policies").json()
    assert policies["policy_file"] == str(path) and policies["default"] == "batch"
    assert set(policies["named"]) == {"built-in", "batch", "interactive"}
    assert policies["named"]["batch"]["flex_budget_s"] == 1800 and policies["named"]["interactive"]["flex"] is False
    assert policies["rules"] == [{"policy": "interactive", "client": "team-b", "model": None}]
    clients = {c["name"]: c for c in policies["clients"]}
    assert set(clients) == {"default", "team-a", "team-b"}
    assert clients["team-a"]["policy_header"] is True and clients["team-a"]["standard_spend_cap_usd"] == 20.0
    assert clients["team-a"]["standard_spent_today_usd"] > 0 and clients["team-b"]["standard_spent_today_usd"] == 0
    assert "secret" not in str(policies)


def test_no_key_in_any_control_plane_answer(make_proxy, sim: Simulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policies.toml"
    path.write_text(POLICY_FILE)
    proxy = make_proxy(
        api_key="sk-proxy-secret", client_keys="team-a team-a-secret,team-b-secret", admin_key="adm-secret",
        policy_file=str(path),
    )  # fmt: skip
    proxy.client(api_key="team-a-secret").chat.completions.create(model="o3", messages=MESSAGES)
    proxy.client(api_key="team-b-secret").chat.completions.create(model="o3", messages=MESSAGES)
    for path in ("/healthz", "/readyz", "/metrics", *CONTROL):
        assert "secret" not in httpx.get(proxy.url + path).text, path


def test_a_base_url_without_v1_is_told_to_add_it(proxy: ProxyServer, sim: Simulator) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key="sk-client", max_retries=0)
    with client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "unknown_url"
    assert "add /v1 to the client's base_url" in caught.value.message and proxy.base_url in caught.value.message
    for method, path in (("POST", "/responses"), ("GET", "/models"), ("GET", "/models/o3")):
        error = error_of(httpx.request(method, proxy.url + path))
        assert "add /v1" in error["message"] and error["type"] == "invalid_request_error", path
    other = httpx.get(proxy.url + "/favicon.ico")
    assert other.status_code == 404 and "add /v1" not in error_of(other)["message"]
    assert sim.requests == []  # none of these reached upstream


def test_unknown_v1_paths_never_reach_the_control_plane(proxy: ProxyServer, sim: Simulator) -> None:
    response = httpx.get(proxy.url + "/v1/flex/status", headers={"authorization": "Bearer k"})
    assert response.json()["echo"]["path"] == "/v1/flex/status"  # the simulator's echo: passed through upstream
    assert [r.path for r in sim.requests] == ["/v1/flex/status"]


async def test_dispatch_sends_v1_to_the_pipeline_and_the_rest_to_fastapi() -> None:
    seen: list[str] = []

    async def pipeline(scope: Any, receive: Any, send: Any) -> None:
        seen.append("pipeline " + scope.get("path", scope["type"]))

    async def control(scope: Any, receive: Any, send: Any) -> None:
        seen.append("control " + scope.get("path", scope["type"]))

    app = FlexProxy(pipeline, control, None)  # type: ignore[arg-type]
    for scope in (
        {"type": "http", "path": "/v1/chat/completions"},
        {"type": "http", "path": "/v1/"},
        {"type": "http", "path": "/v1"},
        {"type": "http", "path": "/healthz"},
        {"type": "websocket", "path": "/v1/realtime"},
        {"type": "lifespan"},
    ):
        await app(scope, None, None)  # type: ignore[arg-type]
    assert seen == [
        "pipeline /v1/chat/completions", "pipeline /v1/", "control /v1", "control /healthz",
        "control /v1/realtime", "control lifespan",
    ]  # fmt: skip


async def test_loop_lag_sampler_measures_a_blocked_loop() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("lag", "lag", registry=registry)
    sampler = asyncio.get_running_loop().create_task(sample_loop_lag(gauge, interval_s=0.05))
    await asyncio.sleep(0.01)  # the sampler is asleep in its timer
    time.sleep(0.3)  # the loop is blocked: the timer fires about 0.25 s late
    deadline = time.monotonic() + 5
    while (registry.get_sample_value("lag") or 0) < 0.2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    sampler.cancel()
    assert 0.2 <= (registry.get_sample_value("lag") or 0) < 1.0


def test_lifespan_stops_the_sampler_and_the_upstream_client(make_proxy, sim: Simulator) -> None:  # type: ignore[no-untyped-def]
    proxy = make_proxy()
    assert "flexproxy_event_loop_lag_seconds" in proxy.metrics()
    services = proxy.app.services
    proxy.stop()
    assert services.draining and not services.upstream.started
