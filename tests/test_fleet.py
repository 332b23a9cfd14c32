"""A fleet: two real `flex-proxy` processes, one real Redis and the simulated upstream, all on 127.0.0.1. A spend
cap holds across the replicas and across a restart; Redis killed, both serve on (metric and status say local
mode, one log line each) and rejoin when it is back; a wrong password means local mode with one clear line; the
fleet's daily ledger adds up to the replicas' own counters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis_server import RedisServer, free_port
from soak import Metrics, flex_proxy_command

from proxy.fleet_ledger import FleetLedger
from proxy.ledger import Ledger, Tally
from proxy.shared import SharedState
from proxy.sim import Reply, SimServer, Simulator

MESSAGES = [{"role": "user", "content": "hi"}]
COSTLY = {"input": 1250, "output": 1250}  # gpt-4.1 at standard: 1250 x $2/M + 1250 x $8/M = $0.0125


class Replica:
    """One `flex-proxy` process with its own log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}
        # No drain delay: stop() sends SIGTERM, and nothing polls /readyz.
        env |= {"FLEX_PROXY_DRAIN_DELAY_S": "0"} | self.env | {"FLEX_PROXY_PORT": str(self.port)}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([flex_proxy_command()], env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flex-proxy did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def _healthy(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str, **headers: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30,
                                  default_headers=headers)  # fmt: skip

    def metrics(self) -> Metrics:
        return Metrics(httpx.get(self.url + "/metrics", timeout=5).text)

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/flex/status", timeout=5).json())

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def replicas(
    sim_server: SimServer, sim: Simulator, tmp_path: Path
) -> Iterator[Callable[..., Replica]]:
    started: list[Replica] = []

    def make(state_url: str, name: str, **env: str) -> Replica:
        values = {
            "FLEX_PROXY_UPSTREAM_BASE_URL": sim_server.base_url,
            "FLEX_PROXY_STATE_URL": state_url,
            "FLEX_PROXY_BACKOFF_INITIAL_S": "0.01",
            "FLEX_PROXY_BACKOFF_MAX_S": "0.05",
            "FLEX_PROXY_MIN_BACKOFF_S": "0.005",
            "FLEX_PROXY_GATE_PROBE_INITIAL_S": "0.01",
            "FLEX_PROXY_GATE_PROBE_MAX_S": "0.05",
        } | env
        replica = Replica(values, tmp_path / f"{name}.log").start()
        started.append(replica)
        return replica

    yield make
    for replica in started:
        replica.stop()


def team_env(tmp_path: Path, cap: float) -> dict[str, str]:
    policy = tmp_path / "policy.toml"
    policy.write_text(f"[clients.team]\nstandard_spend_cap_usd = {cap}\n")
    return {
        "FLEX_PROXY_POLICY_FILE": str(policy),
        "FLEX_PROXY_API_KEY": "sk-upstream",
        "FLEX_PROXY_CLIENT_KEYS": "team ck-team,web ck-web",
    }


async def ask(replica: Replica, model: str = "gpt-4.1", key: str = "ck-team", **headers: str) -> str:
    """One request; what came back: the served tier, or the error's code."""
    client = replica.client(key, **headers)
    try:
        answer = await client.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
        return str(answer.service_tier)
    except openai.APIStatusError as exc:
        return str(exc.code)
    finally:
        await client.close()


def test_a_cap_holds_across_two_replicas_and_a_restart(
    replicas: Callable[..., Replica], redis_server: RedisServer, sim: Simulator, tmp_path: Path
) -> None:
    env = team_env(tmp_path, 0.02)
    one, two = replicas(redis_server.url(), "one", **env), replicas(redis_server.url(), "two", **env)
    sim.script(*(Reply(usage=COSTLY, delay_s=0.3) for _ in range(20)))

    async def burst() -> list[str]:
        return await asyncio.gather(*(ask(one if i % 2 else two) for i in range(20)))

    answers = asyncio.run(burst())
    sent = len(sim.requests)
    # Without the shared cap, all 20 went through ($0.25). Here: the first alone (no estimate yet), then one more
    # alone (0.0125 spent, another 0.0125 would pass 0.02), then none: $0.025, one request past the cap.
    assert sent == 2, answers
    assert answers.count("default") == 2 and answers.count("standard_spend_cap") == 18
    cost = sum(r.metrics().total("flexproxy_cost_usd_total", client="team") for r in (one, two))
    assert cost == pytest.approx(0.025)
    clients = {c["name"]: c for c in httpx.get(one.url + "/flex/policies").json()["clients"]}
    assert clients["team"]["standard_spent_today_usd"] == pytest.approx(0.025)
    assert clients["team"]["spend_scope"] == "fleet"

    two.stop()  # a restart forgets nothing: the day's spend is in Redis
    two.start()
    assert asyncio.run(ask(two)) == "standard_spend_cap"
    assert asyncio.run(ask(two, key="ck-web")) == "default"  # another client has its own day
    assert len(sim.requests) == sent + 1


def test_redis_killed_both_serve_on_and_rejoin_when_it_is_back(
    replicas: Callable[..., Replica], redis_server: RedisServer, sim: Simulator
) -> None:
    one, two = replicas(redis_server.url(), "one"), replicas(redis_server.url(), "two")
    for replica in (one, two):
        assert replica.metrics().total("flexproxy_shared_state_up") == 1
        assert replica.status()["shared_state"]["mode"] == "shared"
    redis_server.stop()
    answers = asyncio.run(_round(one, two, 10))
    assert answers == ["flex"] * 10  # serving on, each on its own
    for replica in (one, two):
        assert until(lambda r=replica: r.metrics().total("flexproxy_shared_state_up") == 0)  # type: ignore[misc]
        shared = replica.status()["shared_state"]
        assert shared["mode"] == "local" and shared["last_error"] == "unreachable"
        assert shared["where"] == f"redis://127.0.0.1:{redis_server.port}/0"
    time.sleep(1.0)  # reconnect attempts go on, quietly
    for replica in (one, two):
        assert len(replica.lines("serving in local mode")) == 1, replica.log.read_text()
    redis_server.start()
    for replica in (one, two):
        assert until(lambda r=replica: r.metrics().total("flexproxy_shared_state_up") == 1)  # type: ignore[misc]
        assert replica.status()["shared_state"]["mode"] == "shared"
        assert len(replica.lines(": shared mode")) == 1
    assert asyncio.run(_round(one, two, 4)) == ["flex"] * 4


async def _round(one: Replica, two: Replica, count: int) -> list[str]:
    return await asyncio.gather(*(ask(one if i % 2 else two, model="o3", key="k") for i in range(count)))


def test_a_wrong_password_means_local_mode_with_one_clear_line(
    replicas: Callable[..., Replica], tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("redis"), password="the-right-one").start()
    try:
        replica = replicas(server.url(password="not-the-password"), "one")
        assert asyncio.run(ask(replica, model="o3", key="k")) == "flex"
        said = replica.lines("shared state")
        assert len(said) == 1 and "refused the password" in said[0] and "local mode" in said[0], said
        assert "not-the-password" not in replica.log.read_text()
        assert replica.metrics().total("flexproxy_shared_state_up") == 0
        status = replica.status()["shared_state"]
        assert status["mode"] == "local" and status["last_error"] == "auth"
        assert "not-the-password" not in str(status)
    finally:
        server.stop()


def test_the_fleet_ledger_adds_up_to_the_replicas_counters(
    replicas: Callable[..., Replica], redis_server: RedisServer, sim: Simulator
) -> None:
    one, two = replicas(redis_server.url(), "one"), replicas(redis_server.url(), "two")
    # Flex answers, flex refusals that fall back to standard, standard-only models: every kind of money.
    for replica in (one, two):
        sim.script(Reply(kind="flex_429"))
        assert asyncio.run(ask(replica, model="o3", key="k", **{"X-Flex-On-Unavailable": "standard"})) == "default"

    async def traffic() -> list[str]:
        asked = [ask(r, model=m, key="k", **h) for r in (one, two) for m, h in (
            ("o3", {}), ("gpt-4.1", {}), ("gpt-5-mini", {}), ("o3", {"X-Flex-Tier": "off"}),
        )]  # fmt: skip
        return await asyncio.gather(*asked)

    for _ in range(3):
        asyncio.run(traffic())
    time.sleep(1.5)  # each replica writes its ledger about once a second

    async def fleet_days() -> dict[str, dict[tuple[str, str], Tally]]:
        shared = SharedState(redis_server.url())
        await shared.start()
        try:
            return await FleetLedger(Ledger(time.time()), shared).days(1, time.strftime("%Y-%m-%d", time.gmtime()))
        finally:
            await shared.close()

    cells = next(iter(asyncio.run(fleet_days()).values()))
    total = Tally()
    for cell in cells.values():
        total.merge(cell)
    scrapes = [r.metrics() for r in (one, two)]

    def both(name: str, **labels: str) -> float:
        return sum(m.total(name, lambda found: found.get("endpoint") != "other", **labels) for m in scrapes)

    assert total.requests == both("flexproxy_requests_total") == 26
    assert total.served_flex == both("flexproxy_requests_total", served_tier="flex")
    assert total.fallbacks == both("flexproxy_fallbacks_total") == 2
    assert total.cost_nusd / 1e9 == pytest.approx(sum(m.total("flexproxy_cost_usd_total") for m in scrapes))
    assert total.saved_nusd / 1e9 == pytest.approx(sum(m.total("flexproxy_cost_saved_usd_total") for m in scrapes))
    assert total.lost_nusd / 1e9 == pytest.approx(sum(m.total("flexproxy_savings_lost_usd_total") for m in scrapes))
    assert total.cost_nusd > 0 and total.saved_nusd > 0 and total.lost_nusd > 0
