"""proxy.policies and the per-team controls: the file as tables, then named clients, policies, the spend cap,
shadow mode and cost headers end to end through the official SDK."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ProxyServer

from proxy.config import Settings
from proxy.errors import ClientError
from proxy.policies import BUILT_IN, PolicyFileError, check_file, load
from proxy.sim import Reply, Simulator

EXAMPLE = """\
default = "batch"

[policies.interactive]
flex = false

[policies.batch]
strategy = "backoff-then-standard"
flex_budget_s = 1800
max_flex_attempts = 20

[policies.eval]
strategy = "backoff"
flex_budget_s = 3600

[clients.nightly]
policy_header = true
standard_spend_cap_usd = 20.0

[[rules]]
client = "web-*"
policy = "interactive"

[[rules]]
model = "o3*"
client = "research"
policy = "eval"
"""
MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"input": 1_000_000, "cached": 200_000, "output": 500_000}
O3_STANDARD = 5.70  # OpenAI pricing, o3: 0.8M x $2 + 0.2M x $0.50 + 0.5M x $8
O3_FLEX = 2.85


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policies.toml"
    path.write_text(text)
    return path


# -- the file ------------------------------------------------------------------------------------------------


def test_the_example_loads_and_selects_by_precedence(tmp_path: Path) -> None:
    policies = load(write(tmp_path, EXAMPLE), Settings())
    assert policies.select("web-shop", "o3", None).name == "interactive"
    assert policies.select("research", "o3-2025-04-16", None).name == "eval"
    assert policies.select("research", "gpt-5", None).name == "batch"  # no rule: the default
    assert policies.select("nightly", "o3", "eval").name == "eval"  # the header, for a client allowed it
    assert policies.policies["batch"].flex_budget_s == 1800
    assert policies.policies["interactive"].flex is False
    assert policies.client("nightly").standard_spend_cap_usd == 20.0


def test_without_a_file_the_built_in_policy_follows_the_settings() -> None:
    policies = load(None, Settings(on_unavailable="backoff", flex_budget_s=33))
    chosen = policies.select("anyone", "o3", None)
    assert (chosen.name, chosen.strategy, chosen.flex_budget_s) == (BUILT_IN, "backoff", 33)


@pytest.mark.parametrize(
    ("client", "header", "message"),
    [("web-shop", "eval", "may not choose"), ("nightly", "nope", "names no policy")],
)
def test_the_policy_header_is_honoured_only_where_allowed(
    tmp_path: Path, client: str, header: str, message: str
) -> None:
    policies = load(write(tmp_path, EXAMPLE), Settings())
    with pytest.raises(ClientError, match=message):
        policies.select(client, "o3", header)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('[policies.a]\nstrategy = "sometimes"\n', 2, "strategy must be one of"),
        ("[policies.a]\nflex = 1\n", 2, "flex must be bool"),
        ("[policies.a]\n\nflex_budget_z = 3\n", 3, "unknown key 'flex_budget_z'"),
        ('[[rules]]\npolicy = "a"\n', 1, "names no policy"),
        ('[policies.a]\n[[rules]]\nmodel = "o3"\n', 2, "needs policy"),
        ('default = "nope"\n', 1, "default names no policy"),
        ("[clients.x]\nstandard_spend_cap_usd = -1\n", 2, "standard_spend_cap_usd must be"),
        ("[policies.a]\nmax_flex_attempts = 0\n", 2, "max_flex_attempts must be a whole number from 1 to 100"),
        ("[policies.a]\nmax_flex_attempts = 101\n", 2, "max_flex_attempts must be a whole number from 1 to 100"),
        ("[policies.a]\nmax_flex_attempts = 9223372036854775807\n", 2, "max_flex_attempts must be a whole number"),
        ("[policies.a]\nflex_budget_s = -0.5\n", 2, "flex_budget_s must be a finite number of seconds, 0 or more"),
        ("[policies.a]\nflex_budget_s = -1\n", 2, "flex_budget_s must be a finite number of seconds, 0 or more"),
        ("[policies.a]\nflex_budget_s = nan\n", 2, "seconds, 0 or more, not nan"),
        ("[policies.a]\nflex_budget_s = inf\n", 2, "flex_budget_s must be a finite number of seconds, 0 or more"),
        ("[policies.a]\n\nflex_budget_s = -nan\n", 3, "flex_budget_s must be a finite number"),
        ("[policies.a]\nrequest_budget_s = 0\n", 2, "request_budget_s must be a finite number of seconds, more than 0"),
        ("[policies.a]\nrequest_budget_s = -inf\n", 2, "request_budget_s must be a finite number of seconds"),
        ("[policies.a]\nrequest_budget_s = +inf\n", 2, "request_budget_s must be a finite number of seconds"),
        ("[policies.a]\nrequest_budget_s = nan\n", 2, "request_budget_s must be a finite number of seconds"),
        ("[clients.x]\nstandard_spend_cap_usd = nan\n", 2, "standard_spend_cap_usd must be a finite number"),
        ("[clients.x]\nstandard_spend_cap_usd = inf\n", 2, "standard_spend_cap_usd must be a finite number"),
        ("[policies.a\n", 1, "line 1"),  # TOML syntax: tomllib's own message names the line
    ],
)
def test_a_bad_file_names_the_line_and_the_problem(tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyFileError) as caught:
        load(path, Settings())
    assert problem in str(caught.value)
    assert f"line {line}" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("max_flex_attempts = 1", "max_flex_attempts", 1),
        ("max_flex_attempts = 100", "max_flex_attempts", 100),
        ("flex_budget_s = 0", "flex_budget_s", 0),
        ("flex_budget_s = 0.0", "flex_budget_s", 0.0),
        ("flex_budget_s = 1e300", "flex_budget_s", 1e300),
        ("request_budget_s = 0.001", "request_budget_s", 0.001),
    ],
)
def test_numbers_at_their_bounds_are_taken(tmp_path: Path, text: str, key: str, value: float) -> None:
    policies = load(write(tmp_path, f"[policies.a]\n{text}\n"), Settings())
    assert getattr(policies.policies["a"], key) == value


def test_check_policy_summarises_a_good_file(tmp_path: Path) -> None:
    assert "ok: policies interactive, batch, eval; default batch; 2 rule(s)" in check_file(write(tmp_path, EXAMPLE))


# -- end to end -----------------------------------------------------------------------------------------------


def sdk(proxy: ProxyServer, key: str, **headers: str) -> openai.OpenAI:
    return proxy.client(api_key=key, default_headers=headers or None)


def test_two_named_clients_get_their_own_policy_and_their_own_money(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, tmp_path: Path
) -> None:
    rules = '[policies.eval]\nstrategy = "backoff"\n\n[[rules]]\nclient = "evals"\npolicy = "eval"\n'
    policy_file = write(tmp_path, rules)
    proxy = make_proxy(api_key="sk-upstream", client_keys="evals ck-evals,web ck-web", policy_file=policy_file,
                       flex_gate=False, max_flex_attempts=2)  # fmt: skip
    # The same two flex 429s: the web client (built-in backoff-then-standard) falls back to standard...
    sim.script(Reply(kind="flex_429"), Reply(kind="flex_429"), Reply(usage=USAGE))
    assert sdk(proxy, "ck-web").chat.completions.create(model="o3", messages=MESSAGES).service_tier == "default"  # type: ignore[arg-type]
    # ...while the eval client's policy waits on flex and answers the 429 rather than pay standard.
    sim.script(Reply(kind="flex_429"), Reply(kind="flex_429"))
    with pytest.raises(openai.RateLimitError):
        sdk(proxy, "ck-evals").chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert [r.tier for r in sim.requests] == ["flex", "flex", "auto", "flex", "flex"]
    assert all(r.headers["authorization"] == "Bearer sk-upstream" for r in sim.requests)
    sim.script(Reply(usage=USAGE))
    sdk(proxy, "ck-evals").chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert proxy.metric("flexproxy_cost_usd_total", client="web", tier="standard") == pytest.approx(O3_STANDARD)
    assert proxy.metric("flexproxy_savings_lost_usd_total", client="web") == pytest.approx(O3_STANDARD - O3_FLEX)
    assert proxy.metric("flexproxy_cost_usd_total", client="evals", tier="flex") == pytest.approx(O3_FLEX)
    assert proxy.metric("flexproxy_cost_saved_usd_total", client="evals") == pytest.approx(O3_STANDARD - O3_FLEX)
    assert proxy.metric("flexproxy_requests_total", client="evals", outcome="flex_unavailable") == 1
    assert "ck-" not in proxy.metrics()


def test_policy_header_only_where_allowed(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, tmp_path: Path
) -> None:
    policy_file = write(tmp_path, "[policies.quiet]\nflex = false\n\n[clients.ops]\npolicy_header = true\n")
    proxy = make_proxy(api_key="sk-upstream", client_keys="ops ck-ops,web ck-web", policy_file=policy_file)
    sdk(proxy, "ck-ops", **{"X-Flex-Policy": "quiet"}).chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert sim.requests[-1].tier is None  # the quiet policy: not put on flex
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(proxy, "ck-web", **{"X-Flex-Policy": "quiet"}).chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "policy_not_allowed"
    assert len(sim.requests) == 1


def test_the_standard_spend_cap_holds(make_proxy: Callable[..., ProxyServer], sim: Simulator, tmp_path: Path) -> None:
    policy_file = write(tmp_path, "[clients.team]\nstandard_spend_cap_usd = 5.0\n")
    proxy = make_proxy(api_key="sk-upstream", client_keys="team ck-team", policy_file=policy_file, flex_gate=False,
                       max_flex_attempts=1)  # fmt: skip
    client = sdk(proxy, "ck-team")
    sim.script(Reply(kind="flex_429"), Reply(usage=USAGE))  # a fallback: $5.70 at standard, past the $5 cap
    assert client.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "default"  # type: ignore[arg-type]
    # Past the cap: a flex 429 is answered, never re-sent on standard...
    sim.script(Reply(kind="flex_429"))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    # ...a flex answer is still fine...
    sim.script(Reply(usage=USAGE))
    assert client.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "flex"  # type: ignore[arg-type]
    # ...and a model that only runs on standard is refused before it costs anything.
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "standard_spend_cap"
    assert [r.tier for r in sim.requests] == ["flex", "auto", "flex", "flex"]
    assert proxy.metric("flexproxy_cost_usd_total", client="team", tier="standard") == pytest.approx(O3_STANDARD)


def test_a_fallback_is_checked_against_the_cap_when_it_is_sent(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, tmp_path: Path
) -> None:
    """The cap is checked before every standard send, not only at admission: a flex request admitted under the cap
    waits in the gate while another request of the same client spends past it; its fallback is then refused and
    the client gets the flex 429 instead of a standard answer past its cap."""
    policy_file = write(tmp_path, "[clients.team]\nstandard_spend_cap_usd = 5.0\n")
    proxy = make_proxy(api_key="sk-upstream", client_keys="team ck-team", policy_file=policy_file,
                       flex_budget_s=1.5, gate_probe_initial_s=5, gate_probe_max_s=5)  # fmt: skip
    client = sdk(proxy, "ck-team")
    sim.script(Reply(kind="flex_429"), Reply(usage=USAGE))
    waiting = threading.Thread(target=lambda: errors.append(_raises(client)))
    errors: list[BaseException | None] = []
    waiting.start()  # its flex 429 makes the gate busy; it waits for flex for 1.5 s
    assert sim.wait_for(lambda: len(sim.requests) == 1, 5)
    standard = proxy.client(api_key="ck-team", default_headers={"X-Flex-Tier": "off"})
    assert standard.chat.completions.create(model="o3", messages=MESSAGES).service_tier == "default"  # type: ignore[arg-type]
    waiting.join(10)
    assert isinstance(errors[0], openai.RateLimitError) and errors[0].code == "resource_unavailable"
    assert [r.tier for r in sim.requests] == ["flex", None]  # the fallback never went
    assert proxy.metric("flexproxy_cost_usd_total", client="team", tier="standard") == pytest.approx(O3_STANDARD)


def _raises(client: openai.OpenAI) -> BaseException | None:
    try:
        client.chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    except openai.APIError as exc:
        return exc
    return None


def test_a_capped_clients_streamed_off_answers_are_priced_and_count_against_the_cap(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, tmp_path: Path
) -> None:
    """X-Flex-Tier: off forwards the body as sent, except that a capped client's streamed chat asks for usage (and
    gets the stream without it, as sent): otherwise its standard spend could never be counted, nor the cap trip."""
    policy_file = write(tmp_path, "[clients.team]\nstandard_spend_cap_usd = 5.0\n")
    proxy = make_proxy(api_key="sk-upstream", client_keys="team ck-team,web ck-web", policy_file=policy_file)
    body = {"model": "o3", "messages": MESSAGES, "stream": True}
    for key in ("ck-web", "ck-team"):
        sim.script(Reply(usage=USAGE))
        response = httpx.post(proxy.base_url + "/chat/completions", json=body,
                              headers={"authorization": f"Bearer {key}", "x-flex-tier": "off"})  # fmt: skip
        assert response.status_code == 200
        chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        assert chunks and not any(chunk.get("usage") for chunk in chunks)  # the usage chunk it never asked for
    uncapped, capped = sim.requests[-2:]
    assert "stream_options" not in (uncapped.json or {})  # no cap: exactly as sent
    assert capped.json["stream_options"] == {"include_usage": True}
    assert proxy.metric("flexproxy_cost_usd_total", client="team", tier="standard") == pytest.approx(O3_STANDARD)
    assert proxy.metric("flexproxy_cost_usd_total", client="web") == 0
    # $5.70 spent: past the $5 cap, the next standard request is refused before it costs anything.
    response = httpx.post(proxy.base_url + "/chat/completions", json=body,
                          headers={"authorization": "Bearer ck-team", "x-flex-tier": "off"})  # fmt: skip
    assert response.status_code == 429 and response.json()["error"]["code"] == "standard_spend_cap"
    assert len(sim.requests) == 2


def test_shadow_mode_changes_no_byte_and_counts_what_flex_would_save(
    make_proxy: Callable[..., ProxyServer], sim: Simulator
) -> None:
    proxy = make_proxy(mode="shadow")
    body = b'{ "model":"o3", "messages":[{"role":"user","content":"hi"}], "stream": true }'
    sim.script(Reply(usage=USAGE))
    response = httpx.post(proxy.base_url + "/chat/completions", content=body, headers={"authorization": "Bearer k"})
    assert response.status_code == 200
    assert sim.requests[-1].body == body  # no service_tier, no stream_options: exactly as sent
    sim.script(Reply(usage=USAGE))
    plain = b'{"model":"o3","messages":[{"role":"user","content":"hi"}]}'
    answer = httpx.post(proxy.base_url + "/chat/completions", content=plain, headers={"authorization": "Bearer k"})
    assert sim.requests[-1].body == plain
    # No flex saving was made: no X-Flex-Saved-USD claiming 0; what flex would have saved has its own header.
    assert "x-flex-saved-usd" not in answer.headers
    assert float(answer.headers["x-flex-shadow-saved-usd"]) == pytest.approx(O3_STANDARD - O3_FLEX)
    assert float(answer.headers["x-flex-cost-usd"]) == pytest.approx(O3_STANDARD)
    sim.script(Reply(usage=USAGE))
    raw = proxy.client().chat.completions.with_raw_response.create(model="gpt-4.1", messages=MESSAGES)  # type: ignore[arg-type]
    assert "x-flex-saved-usd" not in raw.headers and "x-flex-shadow-saved-usd" not in raw.headers  # no flex for it
    assert "x-flex-cost-usd" in raw.headers
    # The streamed request asked for no usage, so only the non-streamed o3 answer can be priced; gpt-4.1 has no flex.
    assert proxy.metric("flexproxy_shadow_savings_usd_total", model="o3") == pytest.approx(O3_STANDARD - O3_FLEX)
    assert proxy.metric("flexproxy_shadow_savings_usd_total", model="gpt-4.1") == 0
    assert proxy.metric("flexproxy_cost_saved_usd_total") == 0
    # ...and the stream is not silently left out: it is counted as an answer that could not be priced.
    assert proxy.metric("flexproxy_unpriced_responses_total", model="o3", tier="standard") == 1
    assert proxy.metric("flexproxy_unpriced_responses_total") == 1


def test_a_stream_sent_as_it_came_is_counted_unpriced_outside_shadow_mode_too(
    proxy: ProxyServer, sim: Simulator
) -> None:
    """X-Flex-Tier: off sends the body untouched, so a chat stream that did not ask for usage has none."""
    stream = proxy.client(default_headers={"X-Flex-Tier": "off"}).chat.completions.create(
        model="o3", messages=MESSAGES, stream=True  # type: ignore[arg-type]
    )
    assert list(stream)
    assert proxy.metric("flexproxy_unpriced_responses_total", model="o3", tier="standard") == 1
    assert proxy.metric("flexproxy_cost_usd_total") == 0
    proxy.client().chat.completions.create(model="o3", messages=MESSAGES, stream=False)  # type: ignore[arg-type]
    assert proxy.metric("flexproxy_unpriced_responses_total") == 1  # an answer with usage is priced


@pytest.mark.parametrize("fall_back", [False, True])
def test_cost_headers_match_the_metrics_to_the_cent(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, fall_back: bool
) -> None:
    proxy = make_proxy(flex_gate=False, max_flex_attempts=1)
    sim.script(*([Reply(kind="flex_429")] if fall_back else []), Reply(usage=USAGE))
    raw = proxy.client().chat.completions.with_raw_response.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    cost, saved = float(raw.headers["x-flex-cost-usd"]), float(raw.headers["x-flex-saved-usd"])
    tier = "standard" if fall_back else "flex"
    assert cost == pytest.approx(proxy.metric("flexproxy_cost_usd_total", tier=tier), abs=0.005)
    assert cost == pytest.approx(O3_STANDARD if fall_back else O3_FLEX)
    if fall_back:  # the savings lost, as a negative saving
        assert saved == pytest.approx(-proxy.metric("flexproxy_savings_lost_usd_total"), abs=0.005)
        assert saved == pytest.approx(-(O3_STANDARD - O3_FLEX))
    else:
        assert saved == pytest.approx(proxy.metric("flexproxy_cost_saved_usd_total"), abs=0.005)
        assert saved == pytest.approx(O3_STANDARD - O3_FLEX)


def test_a_bad_policy_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, '[policies.a]\nstrategy = "sometimes"\n')
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--policy-file", str(path), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("flex-proxy:")
    assert "line 2" in done.stderr and "strategy must be one of" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_policy_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    good = subprocess.run([sys.executable, "-m", "proxy", "check-policy", str(write(tmp_path, EXAMPLE))],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert good.returncode == 0 and "ok: policies" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[policies.a]\nflex = 3\n")
    refused = subprocess.run([sys.executable, "-m", "proxy", "check-policy", str(bad)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 1 and "line 2" in refused.stderr


def test_named_client_keys_are_trimmed_and_named() -> None:
    settings = Settings(api_key="sk-x\n", client_keys=" a k1 , k2 ")
    assert [(e.name, e.key.get_secret_value()) for e in settings.named_client_keys] == [("a", "k1"), ("default", "k2")]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "sk-x"
    assert json.dumps(settings.client_names) == '["default", "a"]'
