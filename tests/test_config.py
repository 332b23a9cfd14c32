"""proxy.config and proxy.cli.load_settings: defaults, FLEX_PROXY_* variables, flags, and refusals."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.cli import load_settings
from proxy.config import DEFAULT_FLEX_MODELS, Settings, is_loopback

SECRET = "sk-proj-very-secret-0123456789"
CLIENT_SECRET = "ck-client-secret-9876543210"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the process environment: start every test from none of ours."""
    for name in list(os.environ):
        if name.upper().startswith("FLEX_PROXY_"):
            monkeypatch.delenv(name)


def _env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("upstream_base_url", "https://api.openai.com/v1"),
        ("host", "127.0.0.1"),
        ("port", 8080),
        ("on_unavailable", "backoff-then-standard"),
        ("max_flex_attempts", 4),
        ("backoff_initial_s", 1.0),
        ("backoff_max_s", 30.0),
        ("flex_budget_s", 120.0),
        ("standard_reserve_s", 15.0),
        ("standard_reserve_min_s", 2.0),
        ("standard_reserve_max_s", 120.0),
        ("standard_timeout_s", 600.0),
        ("stream_idle_timeout_s", 300.0),
        ("request_budget_s", 900.0),
        ("retry_read_timeouts", False),
        ("reset_retry_window_s", 2.0),
        ("max_retry_after_s", 60.0),
        ("min_backoff_s", 0.25),
        ("flex_gate", True),
        ("gate_probe_max_s", 0.5),
        ("gate_accept_s", 0.5),
        ("gate_scope", "model"),
        ("flex_max_in_flight", 0),
        ("standard_tier", "auto"),
        ("override_client_tier", False),
        ("inject_background", False),
        ("max_retries", 2),
        ("upstream_timeout_s", 900.0),
        ("connect_timeout_s", 10.0),
        ("max_connections", 10_000),
        ("tcp_keepalive_idle_s", 60),
        ("tcp_keepalive_interval_s", 15),
        ("tcp_keepalive_count", 4),
        ("max_body_mb", 64.0),
        ("max_body_bytes", 64 * 1024 * 1024),
        ("flex_models", DEFAULT_FLEX_MODELS),
        ("api_key", None),
        ("client_keys", ()),
        ("prices_file", None),
        ("log_level", "info"),
        ("log_format", "text"),
        ("shutdown_grace_s", 900.0),  # the request budget: a restart cuts no request that may still be answered
        ("drain_delay_s", 5.0),
    ],
)
def test_defaults(field: str, value: Any) -> None:
    assert getattr(Settings(), field) == value
    assert getattr(load_settings([]), field) == value


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"FLEX_PROXY_PORT": "9000"}, "port", 9000),
        ({"flex_proxy_port": "9001"}, "port", 9001),
        ({"FLEX_PROXY_HOST": "0.0.0.0"}, "host", "0.0.0.0"),
        ({"FLEX_PROXY_ON_UNAVAILABLE": "fail"}, "on_unavailable", "fail"),
        ({"FLEX_PROXY_STANDARD_TIER": "omit"}, "standard_tier", "omit"),
        ({"FLEX_PROXY_OVERRIDE_CLIENT_TIER": "true"}, "override_client_tier", True),
        ({"FLEX_PROXY_INJECT_BACKGROUND": "1"}, "inject_background", True),
        ({"FLEX_PROXY_MAX_BODY_MB": "0.5"}, "max_body_bytes", 512 * 1024),
        ({"FLEX_PROXY_FLEX_MODELS": "o3, gpt-5* ,,o4-mini"}, "flex_models", ("o3", "gpt-5*", "o4-mini")),
        ({"FLEX_PROXY_FLEX_MODELS": ""}, "flex_models", ()),
        ({"FLEX_PROXY_UPSTREAM_BASE_URL": "http://sim:8000/v1/"}, "upstream_base_url", "http://sim:8000/v1"),
        ({"FLEX_PROXY_API_KEY": ""}, "api_key", None),
        ({"FLEX_PROXY_BACKOFF_INITIAL_S": "2", "FLEX_PROXY_BACKOFF_MAX_S": "2"}, "backoff_max_s", 2.0),
        ({"FLEX_PROXY_LOG_FORMAT": "json"}, "log_format", "json"),
        ({"OTHER_PORT": "1"}, "port", 8080),
    ],
)
def test_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], field: str, value: Any) -> None:
    _env(monkeypatch, env)
    assert getattr(Settings(), field) == value


def test_keys_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, {"FLEX_PROXY_API_KEY": SECRET, "FLEX_PROXY_CLIENT_KEYS": f" {CLIENT_SECRET} , second,,"})
    settings = Settings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == SECRET
    assert [key.get_secret_value() for key in settings.client_keys] == [CLIENT_SECRET, "second"]


def test_prices_file_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"models": {}}')
    _env(monkeypatch, {"FLEX_PROXY_PRICES_FILE": str(prices)})
    assert Settings().prices_file == prices


@pytest.mark.parametrize(
    ("env", "field", "message"),
    [
        ({"FLEX_PROXY_PORT": "abc"}, "port", "valid integer"),
        ({"FLEX_PROXY_PORT": "70000"}, "port", "less than or equal to 65535"),
        ({"FLEX_PROXY_PORT": "-1"}, "port", "greater than or equal to 0"),
        ({"FLEX_PROXY_ON_UNAVAILABLE": "retry"}, "on_unavailable", "'backoff', 'standard', 'backoff-then-standard'"),
        ({"FLEX_PROXY_STANDARD_TIER": "flex"}, "standard_tier", "'auto', 'default' or 'omit'"),
        ({"FLEX_PROXY_MAX_FLEX_ATTEMPTS": "0"}, "max_flex_attempts", "greater than or equal to 1"),
        ({"FLEX_PROXY_MAX_RETRIES": "21"}, "max_retries", "less than or equal to 20"),
        ({"FLEX_PROXY_BACKOFF_INITIAL_S": "0"}, "backoff_initial_s", "greater than 0"),
        ({"FLEX_PROXY_UPSTREAM_TIMEOUT_S": "nan"}, "upstream_timeout_s", "finite number"),
        ({"FLEX_PROXY_OVERRIDE_CLIENT_TIER": "maybe"}, "override_client_tier", "valid boolean"),
        ({"FLEX_PROXY_LOG_LEVEL": "trace"}, "log_level", "'debug', 'info', 'warning' or 'error'"),
        ({"FLEX_PROXY_UPSTREAM_BASE_URL": "api.openai.com/v1"}, "upstream_base_url", "http:// or https://"),
        ({"FLEX_PROXY_PRICES_FILE": "/nonexistent/prices.json"}, "prices_file", "no such file: /nonexistent"),
        ({"FLEX_PROXY_BACKOFF_MAX_S": "0.5"}, None, "FLEX_PROXY_BACKOFF_MAX_S: must be at least"),
        ({"FLEX_PROXY_TCP_KEEPALIVE_IDLE_S": "0"}, "tcp_keepalive_idle_s", "greater than or equal to 1"),
        ({"FLEX_PROXY_TCP_KEEPALIVE_IDLE_S": "32768"}, "tcp_keepalive_idle_s", "less than or equal to 32767"),
        ({"FLEX_PROXY_TCP_KEEPALIVE_IDLE_S": "1.5"}, "tcp_keepalive_idle_s", "valid integer"),
        ({"FLEX_PROXY_TCP_KEEPALIVE_IDLE_S": "nan"}, "tcp_keepalive_idle_s", "valid integer"),
        ({"FLEX_PROXY_TCP_KEEPALIVE_INTERVAL_S": "inf"}, "tcp_keepalive_interval_s", "valid integer"),
        ({"FLEX_PROXY_TCP_KEEPALIVE_INTERVAL_S": "-15"}, "tcp_keepalive_interval_s", "greater than or equal to 1"),
        ({"FLEX_PROXY_TCP_KEEPALIVE_COUNT": "128"}, "tcp_keepalive_count", "less than or equal to 127"),
        ({"FLEX_PROXY_TCP_KEEPALIVE_COUNT": "0"}, "tcp_keepalive_count", "greater than or equal to 1"),
        ({"FLEX_PROXY_DRAIN_DELAY_S": "301"}, "drain_delay_s", "less than or equal to 300"),
        ({"FLEX_PROXY_DRAIN_DELAY_S": "-0.1"}, "drain_delay_s", "greater than or equal to 0"),
        ({"FLEX_PROXY_DRAIN_DELAY_S": "inf"}, "drain_delay_s", "finite number"),
    ],
)
def test_invalid_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], field: str | None, message: str
) -> None:
    _env(monkeypatch, env)
    with pytest.raises(ValidationError) as info:
        Settings()
    error = info.value.errors()[0]
    assert error["loc"] == ((field,) if field else ())
    assert message in error["msg"]


@pytest.mark.parametrize("value", ["0", "300"])
def test_drain_delay_at_its_bounds(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    _env(monkeypatch, {"FLEX_PROXY_DRAIN_DELAY_S": value})
    assert Settings().drain_delay_s == float(value)


@pytest.mark.parametrize(
    ("host", "api_key", "client_keys", "error"),
    [
        ("0.0.0.0", SECRET, "", "FLEX_PROXY_CLIENT_KEYS: missing, and required here"),
        ("::", SECRET, "", "FLEX_PROXY_CLIENT_KEYS: missing, and required here"),
        ("192.168.1.5", SECRET, "", "FLEX_PROXY_CLIENT_KEYS: missing, and required here"),
        ("proxy.internal", SECRET, "", "FLEX_PROXY_CLIENT_KEYS: missing, and required here"),
        ("127.0.0.1", SECRET, "", None),
        ("127.0.0.2", SECRET, "", None),
        ("::1", SECRET, "", None),
        ("localhost", SECRET, "", None),
        ("0.0.0.0", SECRET, CLIENT_SECRET, None),
        ("0.0.0.0", "", "", None),
        ("0.0.0.0", None, "", None),
        ("127.0.0.1", None, CLIENT_SECRET, "FLEX_PROXY_CLIENT_KEYS: needs FLEX_PROXY_API_KEY"),
        ("0.0.0.0", "", CLIENT_SECRET, "FLEX_PROXY_CLIENT_KEYS: needs FLEX_PROXY_API_KEY"),
    ],
)
def test_open_relay_rule(
    monkeypatch: pytest.MonkeyPatch, host: str, api_key: str | None, client_keys: str, error: str | None
) -> None:
    env = {"FLEX_PROXY_HOST": host, "FLEX_PROXY_CLIENT_KEYS": client_keys}
    if api_key is not None:
        env["FLEX_PROXY_API_KEY"] = api_key
    _env(monkeypatch, env)
    if error is None:
        assert Settings().host == host
        return
    with pytest.raises(ValidationError) as info:
        Settings()
    assert error in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("LOCALHOST", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_repr_never_shows_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, {"FLEX_PROXY_API_KEY": SECRET, "FLEX_PROXY_CLIENT_KEYS": CLIENT_SECRET, "FLEX_PROXY_HOST": "::"})
    settings = Settings()
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert SECRET not in text
        assert CLIENT_SECRET not in text
    assert "SecretStr('**********')" in repr(settings)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    assert settings.port == 8080


@pytest.mark.parametrize(
    ("env", "argv", "field", "value"),
    [
        ({"FLEX_PROXY_PORT": "9000"}, ["--port", "9001"], "port", 9001),
        ({"FLEX_PROXY_PORT": "9000"}, [], "port", 9000),
        ({"FLEX_PROXY_PORT": "abc"}, ["--port", "9002"], "port", 9002),
        ({}, ["--flex-models", "o3, gpt-5"], "flex_models", ("o3", "gpt-5")),
        ({"FLEX_PROXY_FLEX_MODELS": "gpt-5"}, ["--flex-models", "o3"], "flex_models", ("o3",)),
        ({}, ["--on-unavailable", "standard"], "on_unavailable", "standard"),
        ({"FLEX_PROXY_ON_UNAVAILABLE": "fail"}, ["--on-unavailable", "backoff"], "on_unavailable", "backoff"),
        ({}, ["--override-client-tier", "true"], "override_client_tier", True),
        ({}, ["--upstream-timeout-s", "60"], "upstream_timeout_s", 60.0),
        ({"FLEX_PROXY_API_KEY": SECRET, "FLEX_PROXY_HOST": "0.0.0.0"}, ["--host", "127.0.0.1"], "host", "127.0.0.1"),
    ],
)
def test_flags_override_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str], field: str, value: Any
) -> None:
    _env(monkeypatch, env)
    assert getattr(load_settings(argv), field) == value


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        ({}, ["--port", "abc"], "FLEX_PROXY_PORT: Input should be a valid integer, unable to parse string as an "
                                "integer"),
        ({"FLEX_PROXY_PORT": "abc"}, [], "FLEX_PROXY_PORT: Input should be a valid integer"),
        ({}, ["--port", "70000"], "FLEX_PROXY_PORT: Input should be less than or equal to 65535"),
        ({}, ["--on-unavailable", "nope"], "FLEX_PROXY_ON_UNAVAILABLE: Input should be 'backoff', 'standard', "
                                           "'backoff-then-standard' or 'fail'"),
        ({}, ["--backoff-max-s", "0.5"], "FLEX_PROXY_BACKOFF_MAX_S: must be at least FLEX_PROXY_BACKOFF_INITIAL_S"),
        ({}, ["--standard-reserve-min-s", "9", "--standard-reserve-max-s", "3"],
         "FLEX_PROXY_STANDARD_RESERVE_MAX_S: must be at least"),
        ({}, ["--upstream-base-url", "ftp://x"], "FLEX_PROXY_UPSTREAM_BASE_URL: must start with http:// or https://"),
        ({}, ["--prices-file", "/nonexistent/p.json"], "FLEX_PROXY_PRICES_FILE: no such file: /nonexistent/p.json"),
        ({}, ["--max-retries", "-1"], "FLEX_PROXY_MAX_RETRIES: Input should be greater than or equal to 0"),
        ({"FLEX_PROXY_API_KEY": SECRET}, ["--host", "0.0.0.0"], "FLEX_PROXY_CLIENT_KEYS: missing, and required "
                                                                 "here: FLEX_PROXY_API_KEY is set and the proxy "
                                                                 "listens on 0.0.0.0, a non-loopback address"),
        ({"FLEX_PROXY_CLIENT_KEYS": CLIENT_SECRET}, [],
         "FLEX_PROXY_CLIENT_KEYS: needs FLEX_PROXY_API_KEY, the key used for those clients"),
        ({"FLEX_PROXY_API_KEY": SECRET, "FLEX_PROXY_CLIENT_KEYS": f"a {CLIENT_SECRET},b {CLIENT_SECRET}"}, [],
         "FLEX_PROXY_CLIENT_KEYS: the same key is given twice (the value is not shown)"),
        ({"FLEX_PROXY_API_KEY": SECRET, "FLEX_PROXY_CLIENT_KEYS": f"k1,none {CLIENT_SECRET}"}, [],
         "FLEX_PROXY_CLIENT_KEYS entry 2: the client name 'none' is reserved"),
        ({"FLEX_PROXY_API_KEY": SECRET, "FLEX_PROXY_CLIENT_KEYS": f"-x {CLIENT_SECRET}"}, [],
         "FLEX_PROXY_CLIENT_KEYS entry 1: the client name must be 1-64 letters"),
        ({"FLEX_PROXY_API_KEY": SECRET, "FLEX_PROXY_CLIENT_KEYS": f"a b {CLIENT_SECRET}"}, [],
         "FLEX_PROXY_CLIENT_KEYS entry 1: must be a key, or a name, a space and the key"),
        pytest.param(
            {}, ["--max-body-mb", "inf"], "FLEX_PROXY_MAX_BODY_MB",
            id="max-body-mb-inf",
        ),
    ],
)  # fmt: skip
def test_invalid_setting_exits_with_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str], expected: str
) -> None:
    _env(monkeypatch, env)
    with pytest.raises(SystemExit) as info:
        load_settings(argv)
    message = info.value.code
    assert isinstance(message, str)
    assert "\n" not in message
    assert message.startswith("flex-proxy: invalid setting " + expected)
    # Every error reads "invalid setting NAME: what is wrong", whichever rule found it.
    assert re.match(r"flex-proxy: invalid setting FLEX_PROXY_[A-Z_]+( entry \d+| line \d+)?: \S", message), message
    assert SECRET not in message and CLIENT_SECRET not in message


# -- client keys: a bare key, or `name key` ----------------------------------------------------------------------

BASE64_KEY = "q3MxXn0RzUQjYl7kP9aWbQ=="  # what `openssl rand -base64 16` prints: ends in `=`


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (BASE64_KEY, [("default", BASE64_KEY, False)]),
        ("team q3Mx+/ab==", [("team", "q3Mx+/ab==", False)]),
        ("team   k:1=2", [("team", "k:1=2", False)]),
        (" a k1 , k2 ", [("a", "k1", False), ("default", "k2", False)]),
        ("ab+/cd==", [("default", "ab+/cd==", False)]),
        ("=", [("default", "=", False)]),
        ("web=ck-123", [("default", "web=ck-123", True)]),  # the old form: one bare key, and a warning
        ("a.b-c_9=x", [("default", "a.b-c_9=x", True)]),
        ("-web=ck", [("default", "-web=ck", False)]),  # not a valid name before the `=`: plainly a key
    ],
)
def test_client_key_entries(entries: str, expected: list[tuple[str, str, bool]]) -> None:
    settings = Settings(api_key=SECRET, client_keys=entries)
    found = [(e.name, e.key.get_secret_value(), e.old_form) for e in settings.named_client_keys]
    assert found == expected


@pytest.mark.parametrize(
    ("entries", "where"),
    [
        ("ok-key,bad/name+ q3Mx+/ab==", "FLEX_PROXY_CLIENT_KEYS entry 2"),
        ("-team q3MxSECRETab==", "FLEX_PROXY_CLIENT_KEYS entry 1"),
        ("team q3Mx SECRET", "FLEX_PROXY_CLIENT_KEYS entry 1"),
        ("k1,k2,team q3Mx\x01SECRET", "FLEX_PROXY_CLIENT_KEYS entry 3"),
        ("k1,q3MxSECRET\u00e9", "FLEX_PROXY_CLIENT_KEYS entry 2"),
        ("x" * 65 + " q3MxSECRET", "FLEX_PROXY_CLIENT_KEYS entry 1"),
    ],
)
def test_a_bad_client_key_entry_is_refused_by_position_never_shown(entries: str, where: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_key=SECRET, client_keys=entries)
    text = str(caught.value)
    assert where in text
    for part in ("q3Mx", "SECRET", "bad", "team", "xxxxx"):
        assert part not in text


def test_client_keys_file_names_its_lines(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# team keys\n\n{BASE64_KEY}\nnightly  q3Mx+/ab==\nweb=ck-old\n")
    settings = Settings(api_key=SECRET, client_keys="first", client_keys_file=keys)
    found = [(e.name, e.key.get_secret_value(), e.where, e.old_form) for e in settings.named_client_keys]
    assert found == [
        ("default", "first", "FLEX_PROXY_CLIENT_KEYS entry 1", False),
        ("default", BASE64_KEY, "FLEX_PROXY_CLIENT_KEYS_FILE line 3", False),
        ("nightly", "q3Mx+/ab==", "FLEX_PROXY_CLIENT_KEYS_FILE line 4", False),
        ("default", "web=ck-old", "FLEX_PROXY_CLIENT_KEYS_FILE line 5", True),
    ]
    assert settings.client_names == ("default", "nightly")
    keys.write_text("ok\n# fine\nteam q3Mx SECRET\n")
    with pytest.raises(ValidationError) as caught:
        Settings(api_key=SECRET, client_keys_file=keys)
    assert "FLEX_PROXY_CLIENT_KEYS_FILE line 3" in str(caught.value)
    assert "q3Mx" not in str(caught.value) and "SECRET" not in str(caught.value)


def test_the_same_key_twice_is_refused_unshown() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_key=SECRET, client_keys=f"a {BASE64_KEY},{BASE64_KEY}")
    assert "twice" in str(caught.value) and "q3Mx" not in str(caught.value)
