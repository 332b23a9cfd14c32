"""proxy.cli and proxy.sim.cli: the `flex-proxy` command as a new user meets it, run for real where it matters."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import pytest

from proxy.cli import (
    COMMANDS,
    environment_warnings,
    grace_warnings,
    is_secret,
    key_mode,
    listen,
    load_settings,
    settings_warnings,
    show_default,
    unknown_variables,
)
from proxy.config import DEFAULT_FLEX_MODELS, Settings

BIN = Path(sys.executable).parent / "flex-proxy"
SECRET = "sk-proj-never-on-a-command-line-0123"
RUN_TIMEOUT_S = 30
DATED = "-20[0-9][0-9]-[0-9][0-9]-[0-9][0-9]"


def _env(**extra: str) -> dict[str, str]:
    """This environment without FLEX_PROXY_* settings, plus the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLEX_PROXY_")}
    # No drain delay: these processes are stopped with SIGTERM, and nothing polls their /readyz.
    return env | {"FLEX_PROXY_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1", "FLEX_PROXY_DRAIN_DELAY_S": "0"} | extra


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], env=_env(**env), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )


def _one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


class Running:
    """A real `flex-proxy` process whose stderr is read line by line, with a deadline on every wait."""

    def __init__(self, *args: str, **env: str) -> None:
        self.process = subprocess.Popen(
            [str(BIN), *args], env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        finally:
            self._reader.join(5)
            assert self.process.stderr is not None
            self.process.stderr.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test holds open, listening."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert _one_line(result.stdout) == f"flex-proxy {metadata.version('flex-proxy')}"


def test_help_says_what_every_flag_does() -> None:
    result = run("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines; compare word by word
    for name, info in Settings.model_fields.items():
        flag, variable = "--" + name.replace("_", "-"), "FLEX_PROXY_" + name.upper()
        assert info.description, f"{name} has no description to show in --help"
        assert " ".join(info.description.split()).rstrip(".") in text, name
        assert variable in text, name
        if is_secret(info):
            # Environment only: described among the keys, never offered as a flag (--client-keys-file is another).
            assert not re.search(re.escape(flag) + r"(?![\w-])", text), name
        else:
            assert f"{flag} " in text, name
            assert f"[{variable}; default: " in text, name
    assert "[FLEX_PROXY_PORT; default: 8080; at most 65535]" in text
    assert "[FLEX_PROXY_MAX_FLEX_ATTEMPTS; default: 4; at most 100]" in text  # the cap is said before it bites
    assert "[FLEX_PROXY_MAX_RETRIES; default: 2; at most 20]" in text
    assert "--on-unavailable {backoff,standard,backoff-then-standard,fail}" in text
    assert "keys, read from the environment only, so they stay out of `ps` and shell history:" in text
    assert "FLEX_PROXY_API_KEY: OpenAI key" in text


def test_help_lists_the_commands_and_each_answers_its_own_help() -> None:
    text = " ".join(run("--help").stdout.split())
    assert text.startswith("usage: flex-proxy [OPTIONS] flex-proxy simulate [OPTIONS] flex-proxy check-policy FILE")
    for usage, what in COMMANDS:
        assert f"flex-proxy {usage}: {what}" in text
    assert {usage.split()[0] for usage, _ in COMMANDS} == {"simulate", "check-policy", "report"}
    for command in ("simulate", "check-policy"):
        result = run(command, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: flex-proxy {command} "), result.stdout
    missing = run("check-policy")
    assert missing.returncode == 2
    assert _one_line(missing.stderr) == (
        "flex-proxy check-policy: the following arguments are required: FILE; see flex-proxy check-policy --help"
    )


def test_simulate_help_says_each_default_once() -> None:
    result = run("simulate", "--help")
    options = re.split(r"\n  (?=-)", result.stdout)  # one entry per option, wrapped lines included
    assert len(options) > 10
    for option in options:
        assert option.count("(default:") <= 1, option
    text = " ".join(result.stdout.split())
    assert "(default: accept any)" in text and "(default: None)" not in text
    # The fixed pattern adds to the random windows; the help says so, and how to have the pattern alone.
    assert "besides the random windows of --flex-busy (add --flex-busy 0 for the pattern alone)" in text


def test_help_shows_the_default_flex_models_as_patterns() -> None:
    text = " ".join(run("--help").stdout.split())
    assert "default: o3, o4-mini, gpt-5, gpt-5-mini," in text
    assert "gpt-5.6-luna (each also as <name>-20[0-9][0-9]-[0-9][0-9]-[0-9][0-9], its dated snapshots)" in text
    assert text.count("[0-9][0-9]-[0-9][0-9]") == 1  # the dated-snapshot pattern once, not once per family


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "unset"),
        (False, "false"),
        (8080, "8080"),
        (("o3", "gpt-5*"), "o3, gpt-5*"),
        ((), "none"),
        (DEFAULT_FLEX_MODELS, "o3, o4-mini, gpt-5, "),
        (("o3", "o3" + DATED, "o4-mini"), f"o3, o3{DATED}, o4-mini"),  # o4-mini has no dated pattern: all shown
    ],
)  # fmt: skip
def test_show_default(value: object, shown: str) -> None:
    assert show_default(value).startswith(shown)
    assert show_default(value).count(DATED) <= 1


@pytest.mark.parametrize(
    "args",
    [
        ("--api-key", SECRET),
        (f"--api-key={SECRET}",),
        ("--api-key",),
        ("--client-keys", SECRET),
        ("--port", "1", "--api-key", SECRET),
    ],
)  # fmt: skip
def test_keys_are_refused_as_flags_with_the_reason(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 1
    line = _one_line(result.stderr)
    flag = args[-2] if len(args) > 1 and args[-1] == SECRET else args[-1].split("=")[0]
    variable = "FLEX_PROXY_" + flag.removeprefix("--").replace("-", "_").upper()
    assert line.startswith(f"flex-proxy: {flag} is not a flag: set {variable} in the environment instead."), line
    assert "`ps`" in line and "shell history" in line
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize("name", [name for name, info in Settings.model_fields.items() if is_secret(info)])
def test_no_key_setting_is_a_flag(name: str) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(["--" + name.replace("_", "-"), SECRET])
    assert isinstance(info.value.code, str)
    assert f"is not a flag: set FLEX_PROXY_{name.upper()} in the environment instead" in info.value.code
    assert SECRET not in info.value.code


def test_a_mistyped_flag_gets_the_nearest_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(["--prot", "9000"])
    assert info.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line == "flex-proxy: unrecognized arguments: --prot 9000 (did you mean --port?); see flex-proxy --help"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"FLEX_PROXY_PORT": "1", "flex_proxy_host": "x", "OTHER": "1"}, []),
        ({"FLEX_PROXY_PROT": "1"}, ["FLEX_PROXY_PROT is not a flex-proxy setting and is ignored "
                                    "(did you mean FLEX_PROXY_PORT?)"]),
        ({"flex_proxy_api_keys": "k"}, ["flex_proxy_api_keys is not a flex-proxy setting and is ignored "
                                        "(did you mean FLEX_PROXY_API_KEY?)"]),
        ({"FLEX_PROXY_ZZZ": "1"}, ["FLEX_PROXY_ZZZ is not a flex-proxy setting and is ignored "
                                   "(see flex-proxy --help for the settings)"]),
        ({"FLEX_PROXY_SERVICE_HOST": "10.0.0.1"}, ["FLEX_PROXY_SERVICE_HOST is not a flex-proxy setting and is "
                                                   "ignored (Kubernetes service links set it for a Service named "
                                                   "flex-proxy: set enableServiceLinks: false)"]),
    ],
)  # fmt: skip
def test_unknown_variables(environ: dict[str, str], expected: list[str]) -> None:
    assert unknown_variables(environ) == expected


def test_every_setting_is_a_known_variable() -> None:
    assert unknown_variables(["FLEX_PROXY_" + name.upper() for name in Settings.model_fields]) == []


def test_empty_flex_models_is_warned_about() -> None:
    (warning,) = settings_warnings(Settings(flex_models=()))
    assert warning.startswith("FLEX_PROXY_FLEX_MODELS is empty: no request goes on flex unless it asks")
    assert settings_warnings(Settings()) == []


def test_old_named_keys_get_one_warning_by_position_only() -> None:
    keys = ",".join(f"team{n}=ck-secret-{n}" for n in range(7))
    (warning,) = settings_warnings(Settings(api_key=SECRET, client_keys=f"ck-fine,{keys},q3MxXn0RzUQjYl7kP9aWbQ=="))
    assert warning.startswith("FLEX_PROXY_CLIENT_KEYS entry 2, FLEX_PROXY_CLIENT_KEYS entry 3, ")
    assert "entry 6 and 2 more: `name=key` no longer names a key" in warning
    assert "secret" not in warning and "team" not in warning and "q3Mx" not in warning


def test_a_drain_shorter_than_the_longest_request_is_warned_about() -> None:
    assert grace_warnings(Settings(), Settings().request_budget_s) == [], "the defaults agree with each other"
    assert grace_warnings(Settings(shutdown_grace_s=900), 900) == []  # at the bound: no warning
    (warning,) = grace_warnings(Settings(shutdown_grace_s=30), 900)
    assert warning.startswith("FLEX_PROXY_SHUTDOWN_GRACE_S (30 s) is shorter than the longest a request may wait")
    assert "(900 s, FLEX_PROXY_REQUEST_BUDGET_S or a policy's request_budget_s)" in warning
    assert "terminationGracePeriodSeconds" in warning and "FLEX_PROXY_DRAIN_DELAY_S" in warning


def test_the_start_up_warns_of_a_drain_shorter_than_a_policy_allows(tmp_path: Path) -> None:
    """The longest request is the longest budget of any policy, not only the settings' own."""
    policies = tmp_path / "policies.toml"
    policies.write_text('default = "batch"\n\n[policies.batch]\nrequest_budget_s = 1800\n')
    proxy = Running("--port", "0", "--policy-file", str(policies))
    try:
        proxy.wait_for(r"WARNING FLEX_PROXY_SHUTDOWN_GRACE_S \(900 s\) is shorter than .* \(1800 s, ")
        proxy.wait_for(r"INFO flex-proxy started")
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    ("url", "warning"),
    [
        ("https://api.openai.com/v1", None),
        ("https://api.openai.com/v1/", None),
        ("https://api.openai.com", "is https://api.openai.com, which does not end in /v1: OpenAI serves its API under "
                                   "/v1, so every request would get upstream's 404; set "
                                   "FLEX_PROXY_UPSTREAM_BASE_URL=https://api.openai.com/v1"),
        ("https://eu.api.openai.com/", "set FLEX_PROXY_UPSTREAM_BASE_URL=https://eu.api.openai.com/v1"),
        ("https://API.OpenAI.com/v2", "which does not end in /v1"),
        ("http://127.0.0.1:8081/v1", None),
        # A gateway may serve the API under another path: left alone.
        ("https://gateway.example/openai/v1", None),
        ("https://gateway.example/api/openai", None),
        # No path at all is most likely a forgotten /v1, but some upstreams serve the API at their root.
        ("http://127.0.0.1:8081", "is http://127.0.0.1:8081, with no path: the proxy sends /v1/<rest> to "
                                  "http://127.0.0.1:8081/<rest>"),
    ],
)  # fmt: skip
def test_an_upstream_base_url_without_v1_is_warned_about(url: str, warning: str | None) -> None:
    warnings = settings_warnings(Settings(upstream_base_url=url))
    if warning is None:
        assert warnings == []
    else:
        (found,) = warnings
        assert found.startswith("FLEX_PROXY_UPSTREAM_BASE_URL ") and warning in found, found


def test_an_ignored_openai_api_key_is_warned_about_without_its_value() -> None:
    (warning,) = environment_warnings({"OPENAI_API_KEY": SECRET}, Settings())
    assert warning.startswith("OPENAI_API_KEY is set, but the proxy does not read it: set FLEX_PROXY_API_KEY")
    assert SECRET not in warning
    assert environment_warnings({"OPENAI_API_KEY": SECRET}, Settings(api_key=SECRET)) == []  # type: ignore[arg-type]
    assert environment_warnings({"OPENAI_API_KEY": ""}, Settings()) == []
    assert environment_warnings({}, Settings()) == []


def test_shadow_mode_and_the_misconfigurations_are_said_at_start() -> None:
    proxy = Running(
        "--port", "0", "--mode", "shadow", OPENAI_API_KEY=SECRET, FLEX_PROXY_UPSTREAM_BASE_URL="https://api.openai.com"
    )
    try:
        proxy.wait_for(r"WARNING FLEX_PROXY_UPSTREAM_BASE_URL is https://api\.openai\.com, which does not end in /v1")
        proxy.wait_for(r"WARNING OPENAI_API_KEY is set, but the proxy does not read it: set FLEX_PROXY_API_KEY")
        started = proxy.wait_for(r"INFO flex-proxy started .* upstream=https://api\.openai\.com mode=shadow ")
        assert started
    finally:
        proxy.stop()
    assert SECRET not in "\n".join(proxy.lines)


@pytest.mark.parametrize(
    ("values", "mode"),
    [
        ({}, "pass-through"),
        ({"api_key": SECRET}, "own-key"),
        ({"api_key": SECRET, "client_keys": ("c1", "c2"), "host": "0.0.0.0"}, "client-keys"),
    ],
)
def test_key_mode(values: dict[str, object], mode: str) -> None:
    assert key_mode(Settings(**values)) == mode  # type: ignore[arg-type]


def test_start_up_line_once_listening_with_typo_warnings() -> None:
    proxy = Running("--port", "0", FLEX_PROXY_PROT="9000", FLEX_PROXY_FLEX_MODELS="")
    try:
        proxy.wait_for(r"WARNING FLEX_PROXY_PROT is not a flex-proxy setting .*did you mean FLEX_PROXY_PORT\?")
        proxy.wait_for(r"WARNING FLEX_PROXY_FLEX_MODELS is empty")
        started = proxy.wait_for(r"INFO flex-proxy started version=(\S+) listen=(http://127\.0\.0\.1:\d+) (.*)$")
        assert started.group(1) == metadata.version("flex-proxy")
        assert started.group(3).startswith(
            "upstream=http://127.0.0.1:9/v1 mode=flex strategy=backoff-then-standard keys=pass-through flex_patterns=0 "
            "prices="
        )
        assert int(re.search(r"prices=(\d+)", started.group(3))[1]) > 0  # type: ignore[index]
        # The line comes once the socket is served: the address it names answers at once.
        assert httpx.get(started.group(2) + "/healthz", timeout=5).status_code == 200
    finally:
        proxy.stop()
    assert sum("flex-proxy started" in line for line in proxy.lines) == 1
    assert not any("Traceback" in line for line in proxy.lines)


def test_start_up_line_in_json() -> None:
    env = {"FLEX_PROXY_API_KEY": SECRET, "FLEX_PROXY_CLIENT_KEYS": "ck-1", "FLEX_PROXY_LOG_FORMAT": "json"}
    proxy = Running("--port", "0", "--on-unavailable", "fail", **env)
    try:
        line = proxy.wait_for(r'"message":"flex-proxy started"').string
    finally:
        proxy.stop()
    started = json.loads(line)
    assert started["level"] == "info"
    assert started["version"] == metadata.version("flex-proxy")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", started["listen"])
    assert started["strategy"] == "fail" and started["mode"] == "flex"
    assert started["keys"] == "client-keys"
    assert started["flex_patterns"] == len(DEFAULT_FLEX_MODELS)
    assert started["prices"] > 0
    assert all(json.loads(line) for line in proxy.lines)
    assert SECRET not in "\n".join(proxy.lines)


def test_an_unreachable_shared_state_means_local_mode_in_one_line_and_never_shows_the_password() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = Running("--port", "0", FLEX_PROXY_STATE_URL=f"redis://:{SECRET}@127.0.0.1:{port}/3")
    try:
        started = proxy.wait_for(r"INFO flex-proxy started .* shared_state=(\S+)$")
        local = [line for line in proxy.lines if "shared state" in line]
    finally:
        proxy.stop()
    assert started.group(1) == f"redis://127.0.0.1:{port}/3"
    assert len(local) == 1 and "unreachable at start" in local[0] and "local mode" in local[0], local
    assert SECRET not in "\n".join(proxy.lines)


@pytest.mark.parametrize("url", ["http://cache:6379", "redis://cache:port/0", "cache:6379"])
def test_a_bad_shared_state_url_stops_start_up_without_showing_it(url: str) -> None:
    result = run(FLEX_PROXY_STATE_URL=url.replace("cache", SECRET))
    assert result.returncode != 0
    line = _one_line(result.stderr)
    assert "FLEX_PROXY_STATE_URL" in line and SECRET not in result.stderr + result.stdout


def test_proxy_on_a_busy_port_fails_with_one_line_before_start_up(busy_port: int) -> None:
    result = run("--port", str(busy_port))
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line.startswith(f"flex-proxy: cannot listen on 127.0.0.1:{busy_port}: address already in use"), line
    assert "--port" in line


def test_simulate_on_a_busy_port_fails_with_one_line(busy_port: int) -> None:
    result = run("simulate", "--port", str(busy_port))
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line == f"flex-proxy simulate: cannot listen on 127.0.0.1:{busy_port}: address already in use"
    assert result.stdout == ""


def test_a_bad_setting_names_the_mistyped_variable_that_explains_it() -> None:
    result = run(FLEX_PROXY_APIKEY=SECRET, FLEX_PROXY_CLIENT_KEYS="ck-1")
    assert result.returncode == 1
    warning, error = result.stderr.splitlines()
    assert warning == (
        "flex-proxy: warning: FLEX_PROXY_APIKEY is not a flex-proxy setting and is ignored "
        "(did you mean FLEX_PROXY_API_KEY?)"
    )
    assert error.startswith("flex-proxy: invalid setting FLEX_PROXY_CLIENT_KEYS: needs FLEX_PROXY_API_KEY")
    assert SECRET not in result.stderr


def test_an_address_not_on_this_machine_is_one_line() -> None:
    with pytest.raises(SystemExit) as info:
        listen("192.0.2.1", 0)  # TEST-NET-1 (RFC 5737): never an address of a test machine
    assert info.value.code == (
        "flex-proxy: cannot listen on 192.0.2.1:0: cannot assign requested address "
        "(no interface of this machine has that address; see --host or FLEX_PROXY_HOST)"
    )
