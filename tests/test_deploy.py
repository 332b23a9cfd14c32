"""Static checks of the image, the compose stack, the Kubernetes manifests, the alerts and the dashboard.

No Docker engine or cluster runs here, so each artefact is checked by the tool that knows its format
(hadolint, the Compose spec schema, kubectl kustomize + kubernetes-validate, promtool), each of those
checks is also shown to fail on a broken copy, and the contracts between files (metric names, ports,
grace periods, secrets) are checked in Python. A missing tool skips its tests, naming it (tests/tools.py);
`bash .ci/run` installs them all.
"""

from __future__ import annotations

import base64
import copy
import email.parser
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tools import need

from proxy.cli import unknown_variables
from proxy.config import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = ("standalone", "sidecar", "sidecar-native")
# The opt-in components for a cluster with the Prometheus Operator, by overlay: its monitor, and the alert rules.
MONITORING = {"standalone": "servicemonitor", "sidecar": "podmonitor", "sidecar-native": "podmonitor"}
# 1.30 is the floor (lifecycle.preStop.sleep); 1.33 is where native sidecars are GA.
K8S_VERSIONS = ("1.30.0", "1.33.0")
IMAGE_REPO = "ghcr.io/flex-proxy/flex-proxy"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

# The metrics contract the dashboard and the alert rules are written against: each metric with its labels.
# test_metric_contract_matches_what_the_proxy_exports holds proxy/metrics.py to it.
_TIERS = {"flex", "standard", "priority", "other", "none"}
LABELS: dict[str, set[str]] = {
    "flexproxy_outcomes_total": {"endpoint", "outcome"},
    "flexproxy_answered_total": {"endpoint", "requested_tier", "served_tier"},
    "flexproxy_requests_total": {"endpoint", "model", "client", "requested_tier", "served_tier", "outcome"},
    "flexproxy_requests_in_flight": {"endpoint"},
    "flexproxy_upstream_attempts_total": {"endpoint", "tier", "status_class"},
    "flexproxy_retries_total": {"endpoint", "model", "reason"},
    "flexproxy_fallbacks_total": {"endpoint", "model"},
    "flexproxy_tier_rejections_total": {"endpoint", "model"},
    "flexproxy_unread_answers_total": {"endpoint", "model", "tier"},
    "flexproxy_tokens_total": {"model", "client", "tier", "kind"},
    "flexproxy_cost_usd_total": {"model", "client", "tier"},
    "flexproxy_cost_saved_usd_total": {"model", "client"},
    "flexproxy_savings_lost_usd_total": {"model", "client"},
    "flexproxy_shadow_savings_usd_total": {"model", "client"},
    "flexproxy_unpriced_responses_total": {"model", "tier"},
    "flexproxy_request_duration_seconds": {"endpoint", "outcome"},
    "flexproxy_backoff_wait_seconds": {"endpoint"},
    "flexproxy_upstream_ttfb_seconds": {"endpoint", "tier"},
    "flexproxy_gate_busy": {"model"},
    "flexproxy_gate_waiting": {"model"},
    "flexproxy_gate_probes_total": {"model", "result"},
    "flexproxy_gate_wait_seconds": {"model"},
    "flexproxy_gate_transitions_total": {"model", "to"},
    "flexproxy_event_loop_lag_seconds": set(),
    "flexproxy_shared_state_up": set(),
    # prometheus-client's ProcessCollector, in the proxy's registry.
    "process_open_fds": set(),
    "process_max_fds": set(),
    "process_resident_memory_bytes": set(),
    "process_cpu_seconds_total": set(),
}
HISTOGRAMS = {"flexproxy_request_duration_seconds", "flexproxy_backoff_wait_seconds", "flexproxy_upstream_ttfb_seconds",
              "flexproxy_gate_wait_seconds"}  # fmt: skip
METRICS = set(LABELS)
QUERYABLE = (METRICS - HISTOGRAMS) | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
# The values a label can take, where the contract bounds them.
VALUES: dict[str, set[str]] = {
    "tier": _TIERS,
    "requested_tier": _TIERS,
    "served_tier": _TIERS,
    "endpoint": {"chat", "responses", "compact", "other"},
    "outcome": {
        "ok", "bad_request", "auth_failed", "upstream_error", "flex_unavailable", "rate_limited", "quota", "too_large",
        "tier_rejected", "server_error", "timeout", "client_deadline", "unreachable", "stream_cut",
        "client_disconnected", "proxy_error", "spend_cap", "shutdown",
    },
    "status_class": {"2xx", "4xx", "429", "5xx", "timeout", "connection_error", "cancelled"},
    "kind": {"input", "cached_input", "output", "reasoning"},
    "result": {"ok", "busy", "error"},
    "to": {"open", "busy"},
}  # fmt: skip
# Labels Prometheus adds to every scraped series (compose: job, instance; the Operator adds the rest).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service"}
WHERE = ("namespace", "pod", "job", "instance")  # what every alert keeps, so a fleet gives named alerts
SELECTOR = re.compile(r"\b((?:flexproxy|process)_[a-z_]+|up)\b(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
METRIC_NAME = re.compile(r"\b(?:flexproxy|process)_[a-z_]+\b")
# Something shaped like a real OpenAI key (sk-..., sk-proj-...), which must never be committed.
OPENAI_KEY = re.compile(r"sk-[A-Za-z0-9_-]{16,}")


def tool(name: str) -> str:
    """A tool from the venv (next to this interpreter) or PATH; the test is skipped, naming it, if it is missing."""
    return need(name)


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def seconds(duration: str | int | float) -> float:
    if isinstance(duration, int | float):
        return float(duration)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert match, f"unparsed duration {duration!r}"
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match[2]]


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "style", "Dockerfile")
    assert result.returncode == 0, output(result)


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /x && apt-get update && apt-get install curl\n")
    result = run(tool("hadolint"), bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3003", "DL3008"):  # :latest, cd in RUN, unpinned apt package
        assert rule in result.stdout, output(result)


def test_dockerfile_runtime_contract() -> None:
    pairs = dockerfile_instructions()
    froms = [args for kw, args in pairs if kw == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    for image in froms:
        ref = image.split()[0]
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*(@sha256:[0-9a-f]{64})?", ref), f"unpinned base {ref}"
    runtime = pairs[max(i for i, (kw, _) in enumerate(pairs) if kw == "FROM") :]
    kws = {kw: args for kw, args in runtime}  # one of each that matters; ENV may repeat
    env = " ".join(args for kw, args in runtime if kw == "ENV")
    user = kws["USER"].split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), "numeric non-root user"
    assert kws["EXPOSE"] == "8080"
    assert kws["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(kws["ENTRYPOINT"]) == ["flex-proxy"], "exec form, so the proxy is PID 1"
    assert "FLEX_PROXY_HOST=0.0.0.0" in env and "FLEX_PROXY_PORT=8080" in env
    healthcheck = kws["HEALTHCHECK"]
    assert "CMD" in healthcheck and "healthcheck.py" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck
    for kw, args in pairs:
        if kw == "RUN" and "pip" in args and " install " in args:
            assert "--no-cache-dir" in args, args
        if kw == "RUN":
            assert "apt-get install" not in args or "rm -rf /var/lib/apt/lists" in args, args


def test_license_is_the_apache_text_that_pyproject_and_the_image_declare() -> None:
    text = (ROOT / "LICENSE").read_text()
    for phrase in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION",
                   "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS"):  # fmt: skip
        assert phrase in text, phrase
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    labels = " ".join(args for kw, args in dockerfile_instructions() if kw == "LABEL")
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    copied = [args.split()[:-1] for kw, args in dockerfile_instructions() if kw == "COPY" and "--from=" not in args]
    assert any("LICENSE" in sources for sources in copied), "the wheel, and so the image, carries the LICENSE"


def dockerignore_admits(path: str, patterns: list[str]) -> bool:
    """Whether Docker's .dockerignore rules keep `path` in the build context (last match wins)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    admitted = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        if any(regex(pattern).fullmatch(prefix) for prefix in prefixes):
            admitted = negate
    return admitted


def test_dockerignore_admits_what_the_build_copies_and_nothing_secret() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for kw, args in dockerfile_instructions():
        if kw == "COPY" and "--from=" not in args:
            sources += args.split()[:-1]
    assert sources, "the Dockerfile copies from the build context"
    for source in sources:
        assert dockerignore_admits(source.strip("/"), patterns), f"{source} is excluded by .dockerignore"
        if source.strip("/") not in ("README.md",):  # README.md is written alongside the package
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    assert dockerignore_admits("proxy/prices.json", patterns)
    assert not dockerignore_admits("proxy/__pycache__/app.cpython-311.pyc", patterns)
    for private in (".env", ".git/config", ".venv/bin/python", "tests/test_deploy.py", ".pytest_cache/x",
                    "bench/results/run.json", "docker-compose.yml"):  # fmt: skip
        assert not dockerignore_admits(private, patterns), f"{private} would enter the build context"


class _Handler(http.server.BaseHTTPRequestHandler):
    """/healthz answers 200, anything else 404; POST bodies are recorded for the demo-traffic test."""

    posts: ClassVar[list[tuple[str, str, dict[str, Any]]]] = []

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts.append((self.path, self.headers["Authorization"], body))
        payload = b'{"object": "chat.completion", "choices": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.posts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_healthcheck_script_exits_by_the_health_of_healthz(local_server: int) -> None:
    script = DEPLOY / "docker" / "healthcheck.py"
    env = {"PATH": os.environ.get("PATH", ""), "FLEX_PROXY_HOST": "0.0.0.0", "FLEX_PROXY_PORT": str(local_server)}
    # A proxy variable meant for the upstream must not capture the local probe.
    env["HTTP_PROXY"] = env["http_proxy"] = "http://127.0.0.1:9/"

    def probe(*args: str) -> int:
        return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, timeout=30).returncode

    assert probe() == 0
    assert probe(f"http://127.0.0.1:{local_server}/missing") == 1
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        assert probe(f"http://127.0.0.1:{sock.getsockname()[1]}/healthz") == 1


def test_demo_traffic_sends_chat_requests(local_server: int) -> None:
    result = subprocess.run(
        [sys.executable, DEPLOY / "docker" / "demo_traffic.py", "--base-url", f"http://127.0.0.1:{local_server}/v1",
         "--api-key", "demo", "--requests", "3", "--workers", "2", "--pause", "0"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(_Handler.posts) == 3
    for path, authorization, body in _Handler.posts:
        assert path == "/v1/chat/completions" and authorization == "Bearer demo"
        assert body["model"] and body["messages"]


def test_constraints_pin_every_runtime_dependency_within_pyproject() -> None:
    pins = {}
    for line in (DEPLOY / "docker" / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        if requirement.marker and not requirement.marker.evaluate({"sys_platform": "linux"}):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is in pyproject.toml but not pinned in deploy/docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement.specifier}"
        )


# --- docker compose -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_matches_the_compose_spec() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["services"]["flex-proxy"].__setitem__("ports", "nope"),
        lambda d: d["services"]["grafana"].__setitem__("restart_policy", "always"),
    ],
    ids=["ports-not-a-list", "unknown-key"],
)
def test_compose_schema_check_fails_on_a_broken_copy(tmp_path: Path, compose: dict[str, Any], breakage: Any) -> None:
    broken = copy.deepcopy(compose)
    breakage(broken)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", path)
    assert result.returncode != 0, output(result)


def test_compose_proxies_are_keyless_hardened_and_drain_before_sigkill(compose: dict[str, Any]) -> None:
    services = compose["services"]
    proxy = services["flex-proxy"]
    assert proxy["build"] == "."
    assert proxy["env_file"] == [{"path": ".env", "required": False}], "keys come from an optional .env"
    assert "FLEX_PROXY_API_KEY" not in proxy["environment"], "never a key in the compose file"
    assert proxy["environment"]["FLEX_PROXY_HOST"] == "0.0.0.0", "so the proxy itself demands client keys"
    proxies = {
        name
        for name, service in services.items()
        if service.get("image") == "flex-proxy:local" and not {"command", "entrypoint"} & service.keys()
    }
    assert proxies == {"flex-proxy", "flex-proxy-demo", "flex-proxy-demo-2"}
    defaults = Settings()
    for name in proxies:
        service = services[name]
        grace = float(service["environment"].get("FLEX_PROXY_SHUTDOWN_GRACE_S", defaults.shutdown_grace_s))
        delay = float(service["environment"].get("FLEX_PROXY_DRAIN_DELAY_S", defaults.drain_delay_s))
        assert grace >= defaults.request_budget_s, f"{name}: the drain cuts requests that may still be answered"
        assert seconds(service["stop_grace_period"]) > delay + grace, f"{name}: SIGKILL before the drain ends"
        assert service["ulimits"]["nofile"]["soft"] >= 65536, f"{name}: two sockets per held request"
        assert "healthcheck.py" in json.dumps(service["healthcheck"]["test"]), name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        image = service["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{name}: unpinned {image}"


PUBLISHED = re.compile(r"127\.0\.0\.1:\$\{([A-Z][A-Z0-9_]*):-(\d+)\}:(\d+)")


def test_compose_host_ports_are_variables_with_defaults(compose: dict[str, Any]) -> None:
    """Each host port can move (another service on 8080 or 3000) without editing the file; env.example lists them."""
    example = (DEPLOY / "docker" / "env.example").read_text()
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            match = PUBLISHED.fullmatch(str(port))
            assert match, f"{name}: {port} is not 127.0.0.1:${{VARIABLE:-default}}:port"
            published[match[1]] = match[2]
            assert f"\n# {match[1]}={match[2]}\n" in example, f"env.example does not show {match[1]}"
            assert not match[1].startswith("FLEX_PROXY_"), "an unknown setting to the proxy, whose env .env is"
    assert published == {"PROXY_PORT": "8080", "DEMO_PROXY_PORT": "8090", "DEMO_PROXY_2_PORT": "8091",
                         "PROMETHEUS_PORT": "9090", "GRAFANA_PORT": "3000"}  # fmt: skip


def env_lines(text: str) -> dict[str, str]:
    """KEY=VALUE lines as docker compose reads an env file (no quotes or inline comments are used in ours)."""
    pairs = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value
    return pairs


def interpolate(value: str, dotenv: dict[str, str]) -> str:
    """`${NAME:-default}` as docker compose expands it: NAME from .env, the default when unset or empty."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: dotenv.get(m[1]) or m[2], value)


def test_env_example_starts_the_proxy_with_any_commented_line_uncommented(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copied to .env as shipped, with each optional line uncommented in turn, the compose proxy's settings load."""
    text = (DEPLOY / "docker" / "env.example").read_text()
    commented = re.findall(r"^# ([A-Z][A-Z0-9_]*=.*)$", text, re.M)
    assert len(commented) >= 5
    assert "FLEX_PROXY_ADMIN_KEY" in env_lines(text), "the control plane can be opened from .env"
    for line in [None, *commented]:
        dotenv = env_lines(text if line is None else text.replace(f"# {line}\n", f"{line}\n"))
        # As compose does: .env first, the service's `environment` over it, ${NAME:-default} filled from .env.
        service = compose["services"]["flex-proxy"]["environment"]
        environment = dotenv | {name: interpolate(str(value), dotenv) for name, value in service.items()}
        for name in [name for name in os.environ if name.startswith("FLEX_PROXY_")]:
            monkeypatch.delenv(name)
        for name, value in environment.items():
            monkeypatch.setenv(name, str(value))
        Settings()  # a bad value raises, naming the setting
        assert unknown_variables(environment) == [], line


def test_compose_demo_profile_needs_no_key(compose: dict[str, Any]) -> None:
    # A required variable (${VAR:?...}) is checked for every service, whatever the profile.
    assert ":?" not in (ROOT / "docker-compose.yml").read_text()
    services = compose["services"]
    demo = {name for name, service in services.items() if "demo" in service.get("profiles", [])}
    assert demo == {"simulator", "flex-proxy-demo", "flex-proxy-demo-2", "demo-traffic"}
    simulator = services["simulator"]["command"]
    assert simulator[:3] == ["simulate", "--host", "0.0.0.0"]
    demo_env = services["flex-proxy-demo"]["environment"]
    assert demo_env["FLEX_PROXY_UPSTREAM_BASE_URL"] == f"http://simulator:{simulator[simulator.index('--port') + 1]}/v1"
    traffic = services["demo-traffic"]["command"]
    assert traffic[traffic.index("--base-url") + 1] == "http://flex-proxy-demo:8080/v1"
    assert traffic[traffic.index("--api-key") + 1] in demo_env["FLEX_PROXY_CLIENT_KEYS"].split(",")
    (script,) = services["demo-traffic"]["volumes"]
    assert (ROOT / script.split(":")[0]).is_file()


def test_compose_proxies_share_their_state_through_the_state_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    state = services["state"]
    assert "ports" not in state, "the shared state is reachable on the compose network only"
    assert "--appendonly" in state["command"] and "state-data:/data" in state["volumes"], "spend survives a restart"
    assert "ping" in json.dumps(state["healthcheck"]["test"])
    urls = {name: services[name]["environment"]["FLEX_PROXY_STATE_URL"] for name in
            ("flex-proxy", "flex-proxy-demo", "flex-proxy-demo-2")}  # fmt: skip
    assert urls["flex-proxy"] == "${FLEX_PROXY_STATE_URL:-redis://state:6379/0}", "a .env value wins"
    assert urls["flex-proxy-demo"] == urls["flex-proxy-demo-2"] == "redis://state:6379/0"
    for name in urls:
        assert "state" in services[name]["depends_on"], name
    demo_prefix = services["flex-proxy-demo"]["environment"]["FLEX_PROXY_STATE_PREFIX"]
    assert demo_prefix == services["flex-proxy-demo-2"]["environment"]["FLEX_PROXY_STATE_PREFIX"] != "flexproxy:"
    published = [port for name in ("flex-proxy-demo", "flex-proxy-demo-2") for port in services[name]["ports"]]
    assert len(set(published)) == 2 and all("${" in port for port in published), "ports are variables"
    traffic = services["demo-traffic"]["command"]
    urls_used = traffic[traffic.index("--base-url") + 1 : traffic.index("--api-key")]
    assert urls_used == ["http://flex-proxy-demo:8080/v1", "http://flex-proxy-demo-2:8080/v1"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["dns_sd_configs"][0]["names"] == ["flex-proxy-demo", "flex-proxy-demo-2"]


def test_compose_monitoring_reads_the_files_under_deploy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    prometheus_yml = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus_yml["scrape_configs"]}
    assert list(jobs) == ["flex-proxy"], "the alert rules select job=flex-proxy: every proxy is in that job"
    assert jobs["flex-proxy"]["static_configs"][0]["targets"] == ["flex-proxy:8080"]
    assert jobs["flex-proxy"]["dns_sd_configs"][0]["names"] == ["flex-proxy-demo", "flex-proxy-demo-2"]
    assert prometheus_yml["rule_files"] == ["alerts.yml"]
    grafana = services["grafana"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in grafana["volumes"] if volume.startswith("./"))
    for source in mounts:
        assert (ROOT / source).is_dir(), source
    dashboards_dir = mounts["./deploy/grafana/dashboards"]
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/") and (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# --- Kubernetes ---------------------------------------------------------------------------------


def render(kustomization_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    result = run(tool("kubectl"), "kustomize", kustomization_dir)
    assert result.returncode == 0, output(result)
    return result.stdout, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Each overlay rendered by `kubectl kustomize`, as shipped: the file written and its documents."""
    out_dir = tmp_path_factory.mktemp("rendered")
    renders = {}
    for overlay in OVERLAYS:
        text, docs = render(K8S / "overlays" / overlay)
        path = out_dir / f"{overlay}.yaml"
        path.write_text(text)
        renders[overlay] = (path, docs)
    return renders


def uncomment_components(text: str) -> str:
    """An overlay's kustomization.yaml with its commented-out `components:` block switched on, as its comment says."""
    out = re.sub(r"^# (components:)$", r"\1", text, flags=re.M)
    return re.sub(r"^# ( {2}- \.\./\.\./components/\S+)", r"\1", out, flags=re.M)


def copy_tree(tmp_path: Path, edits: dict[str, tuple[str, str]] | None = None, *, monitoring: bool = False) -> Path:
    """A copy of deploy/kubernetes with {file: (old, new)} replaced once, and the Operator's components switched
    on in every overlay when `monitoring`."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    for name, (old, new) in (edits or {}).items():
        text = (tree / name).read_text()
        assert text.count(old) == 1, f"{name}: {old!r}"
        (tree / name).write_text(text.replace(old, new))
    if monitoring:
        for overlay in OVERLAYS:
            path = tree / "overlays" / overlay / "kustomization.yaml"
            path.write_text(uncomment_components(path.read_text()))
    return tree


def render_edited_copy(
    tmp_path: Path, edits: dict[str, tuple[str, str]], *, monitoring: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """Every overlay rendered from an edited copy of deploy/kubernetes (see copy_tree)."""
    tree = copy_tree(tmp_path, edits, monitoring=monitoring)
    return {overlay: render(tree / "overlays" / overlay)[1] for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each overlay with its commented-out Prometheus Operator components switched on."""
    return render_edited_copy(tmp_path_factory.mktemp("monitored"), {}, monitoring=True)


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def proxy_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    every = pod.get("containers", []) + pod.get("initContainers", [])
    return [c for c in every if c["name"] == "flex-proxy"]


def resolved_env(container: dict[str, Any], config: dict[str, str]) -> dict[str, str]:
    """Plain values and ConfigMap references of a container's env, with $(VAR) expanded as the kubelet does."""
    values: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            values[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), item["value"])
        elif ref := item.get("valueFrom", {}).get("configMapKeyRef"):
            assert ref["name"].startswith("flex-proxy-config"), ref
            values[item["name"]] = config[ref["key"]]
    return values


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def test_kubernetes_validate_accepts_every_document_and_needs_no_crd(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    """As shipped, `kubectl apply -k` works on a cluster without the Prometheus Operator: only built-in kinds."""
    every = [doc for _, docs in rendered.values() for doc in docs]
    assert not [doc["kind"] for doc in every if "monitoring.coreos.com" in doc["apiVersion"]]
    assert {doc["kind"] for doc in every} >= {
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceAccount",
        "NetworkPolicy",
    }  # fmt: skip
    path = tmp_path / "builtin.yaml"
    path.write_text(yaml.safe_dump_all(every))
    for version in K8S_VERSIONS:
        result = run(tool("kubernetes-validate"), "-k", version, "--strict", "--quiet", path)
        assert result.returncode == 0, output(result)


def test_kubernetes_validate_rejects_a_broken_document(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    deployment = copy.deepcopy(kinds(rendered["standalone"][1], "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # a typo
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = run(tool("kubernetes-validate"), "-k", K8S_VERSIONS[0], "--strict", "--quiet", path)
    assert result.returncode != 0 and "imagePullPolcy" in result.stdout + result.stderr, output(result)


def test_operator_resources_are_opt_in_components_and_the_rules_come_once() -> None:
    """ServiceMonitor, PodMonitor and PrometheusRule live in components the overlays list commented out; the alert
    rules cover every proxy, so no sidecar overlay offers them (one copy per cluster, not one per app)."""
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert not kustomization.get("components"), f"{overlay}: components are opt-in"
        for resource in kustomization.get("resources", []):
            text = (K8S / "overlays" / overlay / resource).read_text() if resource.endswith(".yaml") else ""
            assert "monitoring.coreos.com" not in text, f"{overlay}/{resource}: an Operator kind outside a component"
    commented = re.compile(r"^#\s+- \.\./\.\./components/(\S+)", re.M)
    offered = {o: commented.findall((K8S / "overlays" / o / "kustomization.yaml").read_text()) for o in OVERLAYS}
    assert offered == {"standalone": ["servicemonitor", "alert-rules"], "sidecar": ["podmonitor"], "sidecar-native": []}
    for component, kind in (("servicemonitor", "ServiceMonitor"), ("podmonitor", "PodMonitor"),
                            ("alert-rules", "PrometheusRule")):  # fmt: skip
        resources = yaml.safe_load((K8S / "components" / component / "kustomization.yaml").read_text())["resources"]
        found = [yaml.safe_load((K8S / "components" / component / name).read_text())["kind"] for name in resources]
        assert found == [kind], component


def test_monitoring_resources_are_wired_to_what_they_scrape(monitored: dict[str, list[dict[str, Any]]]) -> None:
    """ServiceMonitor / PodMonitor are CRDs kubernetes-validate cannot know: a structural check instead."""
    for overlay, docs in monitored.items():
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["name"], overlay
        assert len(kinds(docs, "PrometheusRule")) == (overlay == "standalone"), f"{overlay}: the rules once"
        pods = {
            json.dumps(d["spec"]["template"]["metadata"]["labels"], sort_keys=True): d["spec"]["template"]["spec"]
            for d in kinds(docs, "Deployment")
        }
        monitors = kinds(docs, "ServiceMonitor") + kinds(docs, "PodMonitor")
        assert len(monitors) == 1, f"{overlay}: one scrape config for the proxy"
        monitor = monitors[0]
        assert monitor["kind"] == {"servicemonitor": "ServiceMonitor", "podmonitor": "PodMonitor"}[MONITORING[overlay]]
        endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
        assert len(endpoints) == 1
        endpoint = endpoints[0]
        assert endpoint["path"] == "/metrics"
        assert {"targetLabel": "job", "replacement": "flex-proxy"} in endpoint["relabelings"], "alerts use job"
        # The Operator sets endpoint=<port name> on the target, which would rename the proxy's own label.
        assert {"action": "labeldrop", "regex": "endpoint"} in endpoint["relabelings"], overlay
        selector = monitor["spec"]["selector"]["matchLabels"]
        if monitor["kind"] == "ServiceMonitor":
            service = next(s for s in kinds(docs, "Service") if selector.items() <= s["metadata"]["labels"].items())
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
            selector = service["spec"]["selector"]
        pod = next(p for labels, p in pods.items() if selector.items() <= json.loads(labels).items())
        (container,) = proxy_containers(pod)
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        port = endpoint["port"] if monitor["kind"] == "PodMonitor" else service["spec"]["ports"][0]["targetPort"]
        assert port in named, f"{overlay}: the monitor's port {port} is not the proxy's"
        assert env_of(container)["FLEX_PROXY_HOST"]["value"] == "0.0.0.0", "scraped on the pod IP"


def config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"].startswith("flex-proxy-config")]
    data: dict[str, str] = cm["data"]
    return data


SECRET_ENV = {
    "FLEX_PROXY_API_KEY": "openai-api-key",
    "FLEX_PROXY_CLIENT_KEYS": "client-keys",
    "FLEX_PROXY_ADMIN_KEY": "admin-key",
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_proxy_container_is_hardened_probed_and_keyed_from_the_secret(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], overlay: str
) -> None:
    docs = rendered[overlay][1]
    settings = config_map(docs)
    assert not any(re.search("KEY|TOKEN|SECRET|PASSWORD", name) for name in settings), "nothing secret in it"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    found = 0
    for deployment in kinds(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in proxy_containers(pod):
            found += 1
            where = f"{overlay}/{deployment['metadata']['name']}/{container['name']}"
            assert container["image"] == f"{IMAGE_REPO}:{version}", f"{where}: image tag is not {version}"
            sc, pod_sc = container.get("securityContext", {}), pod.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= limits.keys() and container["resources"]["requests"], where
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe, path in (
                ("startupProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
                ("livenessProbe", "/healthz"),
            ):
                http_get = container[probe]["httpGet"]
                assert http_get["path"] == path and http_get["port"] in ports, f"{where}: {probe}"
            env = env_of(container)
            for name, key in SECRET_ENV.items():
                ref = env[name].get("valueFrom", {}).get("secretKeyRef")
                # The admin key is optional: without it the control plane is reached through port-forward only.
                expected = {"name": "flex-proxy-secrets", "key": key} | ({"optional": True} if "ADMIN" in name else {})
                assert ref == expected, f"{where}: {name} not from the Secret"
            assert [r["configMapRef"]["name"] for r in container["envFrom"]] == [
                d["metadata"]["name"] for d in kinds(docs, "ConfigMap")
            ]
            assert pod.get("enableServiceLinks") is False, f"{where}: FLEX_PROXY_PORT=tcp://... would be injected"
            assert pod.get("automountServiceAccountToken") is False, where
    assert found == 1, f"{overlay}: exactly one proxy container"
    assert_drain_ends_before_sigkill(docs, overlay)


def assert_drain_ends_before_sigkill(docs: list[dict[str, Any]], where: str) -> None:
    """The drain covers the longest request the settings allow, SIGKILL waits for the preStop sleep, the drain
    delay and the drain, and one pod drains at a time."""
    settings, defaults = config_map(docs), Settings()
    drain = float(settings.get("FLEX_PROXY_SHUTDOWN_GRACE_S", defaults.shutdown_grace_s))
    delay = float(settings.get("FLEX_PROXY_DRAIN_DELAY_S", defaults.drain_delay_s))
    longest = float(settings.get("FLEX_PROXY_REQUEST_BUDGET_S", defaults.request_budget_s))
    assert drain >= longest, f"{where}: a drain of {drain:g} s cuts requests allowed {longest:g} s"
    for deployment in kinds(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = proxy_containers(pod)
        sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        margin = pod["terminationGracePeriodSeconds"] - (sleep + delay + drain)
        assert margin >= 10, f"{where}: SIGKILL {margin:g} s after the drain's end"
        for hpa in kinds(docs, "HorizontalPodAutoscaler"):
            for policy in hpa["spec"]["behavior"]["scaleDown"]["policies"]:
                assert policy["periodSeconds"] >= pod["terminationGracePeriodSeconds"], f"{where}: two pods draining"


@pytest.mark.parametrize(
    ("drain", "complaint"), [("2000", "SIGKILL"), ("30", "cuts requests")], ids=["grace-left-behind", "too-short"]
)
def test_the_drain_check_fails_on_a_drain_edited_alone(tmp_path: Path, drain: str, complaint: str) -> None:
    edits = {"base/settings.env": ("FLEX_PROXY_SHUTDOWN_GRACE_S=900\n", f"FLEX_PROXY_SHUTDOWN_GRACE_S={drain}\n")}
    for overlay, docs in render_edited_copy(tmp_path, edits).items():
        with pytest.raises(AssertionError, match=complaint):
            assert_drain_ends_before_sigkill(docs, overlay)


def with_components(tmp_path: Path, overlay: str, components: list[str]) -> list[dict[str, Any]]:
    """An overlay rendered with components added around it."""
    wrapper = tmp_path / f"{overlay}-{len(components)}"
    wrapper.mkdir()
    k8s = Path(os.path.relpath(K8S, wrapper))  # kustomize refuses absolute paths
    (wrapper / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(k8s / "overlays" / overlay)], "components": [str(k8s / "components" / n) for n in components],
    }))  # fmt: skip
    return render(wrapper)[1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_proxy_reads_the_shared_state_url_from_an_optional_secret(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], overlay: str
) -> None:
    """The URL holds a password: from a Secret, never rendered from the repository; without it, local mode."""
    docs = rendered[overlay][1]
    (deployment,) = kinds(docs, "Deployment")
    (container,) = proxy_containers(deployment["spec"]["template"]["spec"])
    ref = env_of(container)["FLEX_PROXY_STATE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "flex-proxy-state", "key": "url", "optional": True}
    listed = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text()).get("components", [])
    assert "../../components/shared-state" not in listed, "opt-in: the try-it Redis has no password"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_state_component_runs_one_redis_the_proxies_alone_reach(tmp_path: Path, overlay: str) -> None:
    docs = with_components(tmp_path, overlay, ["shared-state"])
    (secret,) = kinds(docs, "Secret")
    url = base64.b64decode(secret["data"]["url"]).decode()
    deployments = {d["metadata"]["name"]: d for d in kinds(docs, "Deployment")}
    redis = deployments.pop("flex-proxy-state")
    (proxy_deployment,) = deployments.values()
    pod = proxy_deployment["spec"]["template"]
    (container,) = proxy_containers(pod["spec"])
    assert env_of(container)["FLEX_PROXY_STATE_URL"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    service = next(s for s in kinds(docs, "Service") if s["metadata"]["name"] == "flex-proxy-state")
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (valkey,) = redis["spec"]["template"]["spec"]["containers"]
    assert "FLEX_PROXY_STATE_URL" not in env_of(valkey) and not proxy_containers(redis["spec"]["template"]["spec"])
    assert valkey["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert re.search(r":[\w.-]+$", valkey["image"]) and not valkey["image"].endswith(":latest")
    (policy,) = [p for p in kinds(docs, "NetworkPolicy") if p["metadata"]["name"] == "flex-proxy-state"]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert admitted.items() <= pod["metadata"]["labels"].items(), "the proxies' pods are admitted"
    assert not admitted.items() <= redis_labels.items()
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in CRD_KINDS]))
    for version in K8S_VERSIONS:
        result = run(tool("kubernetes-validate"), "-k", version, "--strict", "--quiet", path)
        assert result.returncode == 0, output(result)


def test_no_literal_key_anywhere_in_deploy_or_compose(rendered: dict[str, tuple[Path, list[dict[str, Any]]]]) -> None:
    files = [ROOT / "docker-compose.yml", ROOT / "Dockerfile", *DEPLOY.rglob("*")]
    for path in files:
        if path.is_file():
            assert not OPENAI_KEY.search(path.read_text(errors="replace")), f"{path}: looks like an OpenAI key"
    for overlay, (_, docs) in rendered.items():
        assert not kinds(docs, "Secret"), f"{overlay}: the Secret must not be rendered from the repository"
        for deployment in kinds(docs, "Deployment"):
            pod = deployment["spec"]["template"]["spec"]
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                for name, item in env_of(container).items():
                    if re.search("KEY|TOKEN|SECRET|PASSWORD", name):
                        assert "value" not in item and "secretKeyRef" in item["valueFrom"], f"{overlay}: {name}"
    for kustomization in K8S.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text()).get("resources", [])
        assert not any("secret" in entry for entry in listed), f"{kustomization} lists a Secret"


# Values a reader might paste as a real key: sk-/ck- tokens, and anything assigned to a key variable that is not
# empty, a variable, a <placeholder>, or one of the demo's words (the simulator accepts any key).
KEY_LIKE = re.compile(r"\b(?:sk|ck)-[A-Za-z0-9]")
KEY_ASSIGNED = re.compile(
    r"\b(FLEX_PROXY_(?:API_KEY|CLIENT_KEYS|ADMIN_KEY)|OPENAI_API_KEY)\b[\"']?[ \t]*[=:][ \t]*"
    r"(?:'([^'\n]*)'|\"([^\"\n]*)\"|([^\s\"'`)]*))"
)
DEMO_WORDS = {"", "unused", "demo", "simulator-accepts-anything"}


def assigned_keys(text: str) -> list[tuple[str, str]]:
    """(variable, key) for each key given to a key variable: every entry of a list, named or not."""
    found = []
    for name, *values in KEY_ASSIGNED.findall(text):
        for entry in "".join(values).split(","):
            entry = entry.strip()
            if entry.startswith(("$", "<", "{")):  # a variable or a placeholder, whatever follows
                found.append((name, entry))
                continue
            key = entry.split(None, 1)[1].strip() if len(entry.split(None, 1)) == 2 else entry  # `name key`
            found.append((name, re.sub(r"^[A-Za-z0-9_.-]+=(?=[<$])", "", key)))  # the old `name=<key>`
    return found


def is_placeholder(key: str) -> bool:
    return key.startswith(("$", "<", "{")) or key in DEMO_WORDS


def documents_a_user_reads() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "docker-compose.yml", ROOT / "Dockerfile", *DEPLOY.rglob("*")]
    suffixes = {"", ".md", ".yml", ".yaml", ".env", ".example"}
    return [path for path in files if path.is_file() and path.suffix in suffixes]


def test_no_key_like_value_a_reader_might_paste_as_real() -> None:
    for path in documents_a_user_reads():
        text = path.read_text(errors="replace")
        where = path.relative_to(ROOT)
        assert not KEY_LIKE.search(text), f"{where}: {KEY_LIKE.search(text)[0]!r} looks like a key"  # type: ignore[index]
        for name, key in assigned_keys(text):
            assert is_placeholder(key), f"{where}: {name} is given {key!r}, which a reader might use as a real key"
    # The example Secret's values have spaces: the proxy refuses them as keys, so the example applied as it is
    # stops at start-up rather than run with keys anyone can read here.
    example = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    assert set(example["stringData"]) == {"openai-api-key", "client-keys", "app-key", "admin-key"}
    for key, value in example["stringData"].items():
        assert " " in value.strip() and "<" in value, f"secret.example.yaml {key}: {value!r}"
        key_part = value.split(" ", 1)[1] if key == "client-keys" else value
        assert " " in key_part, f"{key}: the key itself must be refused"


def test_the_key_check_catches_a_pasteable_key(tmp_path: Path) -> None:
    pasteable = (
        "FLEX_PROXY_CLIENT_KEYS=web=ck-123", "export OPENAI_API_KEY=sk-demo", "FLEX_PROXY_ADMIN_KEY: hunter2",
        "FLEX_PROXY_CLIENT_KEYS='web <key of web>,nightly q3MxXn0RzUQjYl7kP9aWbQ=='",
    )  # fmt: skip
    for text in pasteable:
        hits = KEY_LIKE.findall(text) + [key for _, key in assigned_keys(text) if not is_placeholder(key)]
        assert hits, text
    fine = "FLEX_PROXY_CLIENT_KEYS='web <key of web>,<a bare key>' FLEX_PROXY_API_KEY= OPENAI_API_KEY=$KEY"
    assert all(is_placeholder(key) for _, key in assigned_keys(fine)) and not KEY_LIKE.search(fine)


def test_standalone_is_a_replicated_service_with_a_disruption_budget(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]],
) -> None:
    docs = rendered["standalone"][1]
    (deployment,) = kinds(docs, "Deployment")
    (service,) = kinds(docs, "Service")
    (pdb,) = kinds(docs, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HPA owns the count; `kubectl apply` would reset it"
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 8080
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1


def test_standalone_autoscaler_targets_the_deployment_and_scales_down_slowly(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]],
) -> None:
    docs = rendered["standalone"][1]
    (deployment,) = kinds(docs, "Deployment")
    (hpa,) = kinds(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (deployment["apiVersion"], deployment["kind"])
    assert target["name"] == deployment["metadata"]["name"]
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], "one pod alone is a single point of failure"
    (pdb,) = kinds(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB must let a node drain evict a pod"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    pod = deployment["spec"]["template"]["spec"]
    for container in pod["containers"]:  # utilization is undefined if any container lacks a CPU request
        assert container["resources"]["requests"]["cpu"], container["name"]
    # Flex requests are held for minutes, and a removed pod cuts what is still in flight after its drain.
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    for policy in scale_down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1, policy
        assert policy["periodSeconds"] >= pod["terminationGracePeriodSeconds"], "two pods draining at a time"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_accounts_are_rendered_and_hold_no_token(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], overlay: str
) -> None:
    docs = rendered[overlay][1]
    accounts = {sa["metadata"]["name"]: sa for sa in kinds(docs, "ServiceAccount")}
    for account in accounts.values():
        assert account.get("automountServiceAccountToken") is False, account["metadata"]["name"]
    for deployment in kinds(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        name = pod.get("serviceAccountName")
        if overlay == "standalone":
            assert name and name != "default", "the shared proxy runs under its own ServiceAccount"
        if name:
            assert name in accounts, f"{overlay}: serviceAccountName {name} is not rendered in the overlay"


def port_rules(policy: dict[str, Any]) -> tuple[set[int], list[dict[str, Any]]]:
    """The TCP ports a NetworkPolicy opens to every peer, and its rules that name peers."""
    everyone: set[int] = set()
    restricted = []
    for rule in policy["spec"]["ingress"]:
        if rule.get("from"):
            restricted.append(rule)
            continue
        for entry in rule.get("ports", []):
            if entry.get("protocol", "TCP") == "TCP":
                everyone |= set(range(entry["port"], entry.get("endPort", entry["port"]) + 1))
    return everyone, restricted


@pytest.mark.parametrize("overlay", ["sidecar", "sidecar-native"])
def test_sidecar_app_calls_the_proxy_on_loopback_with_its_own_bare_key(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], overlay: str
) -> None:
    docs = rendered[overlay][1]
    (deployment,) = kinds(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (proxy,) = proxy_containers(pod)
    (app,) = [c for c in pod["containers"] if c is not proxy]
    settings = config_map(docs)
    port = int(settings["FLEX_PROXY_PORT"])
    assert resolved_env(app, settings)["OPENAI_BASE_URL"] == f"http://127.0.0.1:{port}/v1"
    # The app sends a bare key; the proxy's client-keys entry may carry the client's name in front of it.
    app_key = env_of(app)["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert app_key == {"name": "flex-proxy-secrets", "key": "app-key"}
    assert env_of(proxy)["FLEX_PROXY_CLIENT_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "client-keys"
    if overlay == "sidecar-native":
        assert proxy in pod["initContainers"] and proxy["restartPolicy"] == "Always"
    else:
        assert proxy in pod["containers"]


@pytest.mark.parametrize("overlay", ["sidecar", "sidecar-native"])
def test_sidecar_network_policy_guards_the_proxy_port_only(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], overlay: str
) -> None:
    """Only Prometheus reaches the proxy's port on the pod IP; every other port of the app's pod stays open, as it
    was without the policy (a policy that selects a pod denies what it does not allow)."""
    docs = rendered[overlay][1]
    (deployment,) = kinds(docs, "Deployment")
    port = int(config_map(docs)["FLEX_PROXY_PORT"])
    (policy,) = kinds(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    everyone, restricted = port_rules(policy)
    assert everyone == set(range(1, 65536)) - {port}, "every TCP port but the proxy's, from anywhere"
    protocols = {entry.get("protocol") for rule in policy["spec"]["ingress"] for entry in rule.get("ports", [])}
    assert {"UDP", "SCTP"} <= protocols, "UDP and SCTP untouched"
    assert all("port" not in e for r in policy["spec"]["ingress"] for e in r["ports"] if e["protocol"] != "TCP")
    (prometheus,) = restricted
    assert prometheus["ports"] == [{"port": port, "protocol": "TCP"}]
    (peer,) = prometheus["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


@pytest.mark.parametrize("overlay", ["sidecar", "sidecar-native"])
def test_sidecar_sets_the_proxy_user_on_its_own_container_not_on_the_pod(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], overlay: str
) -> None:
    """A pod-level runAsUser / runAsNonRoot would bind the user's app container too."""
    (deployment,) = kinds(rendered[overlay][1], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    pod_sc = pod.get("securityContext", {})
    assert not {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup"} & pod_sc.keys(), pod_sc
    (proxy,) = proxy_containers(pod)
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == sc["runAsGroup"] == 10001
    user = next(args for kw, args in reversed(dockerfile_instructions()) if kw == "USER")
    assert user == f"{sc['runAsUser']}:{sc['runAsGroup']}", "the image's own user"


def test_the_network_policy_ranges_sit_around_the_port() -> None:
    """kustomize cannot add 1: values.yaml keeps the port's neighbours, and they must be its neighbours."""
    port = int(re.search(r"^FLEX_PROXY_PORT=(\d+)$", (K8S / "base" / "settings.env").read_text(), re.M)[1])  # type: ignore[index]
    values = yaml.safe_load((K8S / "base" / "values.yaml").read_text())["data"]
    assert (int(values["ports-below-proxy"]), int(values["ports-above-proxy"])) == (port - 1, port + 1)


def test_the_port_is_one_knob(tmp_path: Path) -> None:
    """FLEX_PROXY_PORT in settings.env (and its neighbours in values.yaml) moves the container port, the Service,
    the NetworkPolicy, the monitors and the app's URL."""
    renders = render_edited_copy(tmp_path, {
        "base/settings.env": ("FLEX_PROXY_PORT=8080\n", "FLEX_PROXY_PORT=9310\n"),
        "base/values.yaml": ('ports-below-proxy: "8079"\n  ports-above-proxy: "8081"\n',
                             'ports-below-proxy: "9309"\n  ports-above-proxy: "9311"\n'),
    }, monitoring=True)  # fmt: skip
    for overlay, docs in renders.items():
        assert "8080" not in yaml.safe_dump_all(docs), f"{overlay}: 8080 left somewhere"
        (deployment,) = kinds(docs, "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        (proxy,) = proxy_containers(pod)
        assert [port["containerPort"] for port in proxy["ports"]] == [9310]
        assert config_map(docs)["FLEX_PROXY_PORT"] == "9310"
        if overlay == "standalone":
            (service,) = kinds(docs, "Service")
            assert [port["port"] for port in service["spec"]["ports"]] == [9310]
        else:
            (app,) = [c for c in pod["containers"] if c is not proxy]
            assert resolved_env(app, config_map(docs))["OPENAI_BASE_URL"] == "http://127.0.0.1:9310/v1"
            (policy,) = kinds(docs, "NetworkPolicy")
            everyone, (prometheus,) = port_rules(policy)
            assert everyone == set(range(1, 65536)) - {9310} and prometheus["ports"][0]["port"] == 9310


def test_prometheus_release_label_and_namespace_are_knobs_in_the_base(tmp_path: Path) -> None:
    """kube-prometheus-stack selects rules and monitors by `release: <Helm release>`: one value in values.yaml."""
    values = yaml.safe_load((K8S / "base" / "values.yaml").read_text())
    assert values["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
    release = values["data"]["prometheus-release"]

    def check(renders: dict[str, list[dict[str, Any]]], release: str, namespace: str) -> None:
        for overlay, docs in renders.items():
            assert not any(d["metadata"]["name"] == "flex-proxy-values" for d in docs), "build-time only"
            crds = [d for d in docs if d["kind"] in CRD_KINDS]
            expected = {"standalone": {"ServiceMonitor", "PrometheusRule"}}.get(overlay, {"PodMonitor"})
            assert {crd["kind"] for crd in crds} == expected, overlay
            for crd in crds:
                assert crd["metadata"]["labels"]["release"] == release, f"{overlay}: {crd['kind']}"
            for policy in kinds(docs, "NetworkPolicy"):
                (prometheus,) = port_rules(policy)[1]
                peer = prometheus["from"][0]
                assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}

    check(render_edited_copy(tmp_path / "shipped", {}, monitoring=True), release, "monitoring")
    edited = render_edited_copy(
        tmp_path / "release", {"base/values.yaml": (f"prometheus-release: {release}", "prometheus-release: obs")},
        monitoring=True,
    )  # fmt: skip
    check(edited, "obs", "monitoring")
    edited = render_edited_copy(tmp_path / "namespace", {"base/values.yaml": (
        "prometheus-namespace: monitoring", "prometheus-namespace: observability"
    )}, monitoring=True)  # fmt: skip
    check(edited, release, "observability")


def test_every_overlay_says_how_to_reach_the_control_plane() -> None:
    """Through a port-forward the caller is on loopback: no key. Each overlay, the image and compose say so."""
    for overlay in ("standalone", "sidecar"):
        text = (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
        assert "port-forward" in text and "http://127.0.0.1:8080/" in text, overlay
    native = (K8S / "overlays" / "sidecar-native" / "kustomization.yaml").read_text()
    assert "resources:\n  - ../sidecar\n" in native, "the native sidecar inherits the sidecar's access and Secret"
    for path in (ROOT / "Dockerfile", ROOT / "docker-compose.yml", DEPLOY / "README.md"):
        text = path.read_text()
        assert "FLEX_PROXY_ADMIN_KEY" in text and "loopback" in text, path


# --- Prometheus ---------------------------------------------------------------------------------


def test_promtool_accepts_config_rules_and_rule_unit_tests() -> None:
    promtool = tool("promtool")
    for args in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ):
        result = run(promtool, *args, cwd=DEPLOY / "prometheus")
        assert result.returncode == 0, output(result)


@pytest.mark.parametrize(
    "rules",
    [
        'groups: [{name: x, rules: [{alert: A, expr: "rate(flexproxy_requests_total[5m]"}]}]',
        "groups: [{name: x, rules: [{alert: A, expr: up == 0, fore: 5m}]}]",
    ],
    ids=["bad-promql", "unknown-field"],
)
def test_promtool_rejects_a_broken_rule_file(tmp_path: Path, rules: str) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    result = run(tool("promtool"), "check", "rules", path)
    assert result.returncode != 0, output(result)


def test_prometheus_rule_for_the_operator_matches_alerts_yml(
    monitored: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    (rule,) = kinds(monitored["standalone"], "PrometheusRule")
    assert rule["spec"] == alerts, "PrometheusRule differs from deploy/prometheus/alerts.yml"
    # The comments too: the file is alerts.yml from `groups:` on, indented under spec.
    source = (DEPLOY / "prometheus" / "alerts.yml").read_text().split("\ngroups:\n", 1)[1]
    operator = (K8S / "components" / "alert-rules" / "prometheusrule.yaml").read_text().split("\n  groups:\n", 1)[1]
    assert operator == "".join(f"  {line}" if line.strip() else line for line in source.splitlines(keepends=True))
    path = tmp_path / "spec.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    result = run(tool("promtool"), "check", "rules", path)
    assert result.returncode == 0, output(result)


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Each metric selector in a PromQL expression: its name and {label: (operator, value)}."""
    return [
        (match[1], {m[1]: (m[2], m[3]) for m in MATCHER.finditer(match[2] or "")}) for match in SELECTOR.finditer(expr)
    ]


def contract_problems(expr: str) -> list[str]:
    """Metrics, labels and label values in `expr` that the metrics contract does not have."""
    problems = []
    known = set(TARGET_LABELS)
    for name, matchers in selectors(expr):
        if name != "up" and name not in QUERYABLE:
            problems.append(f"unknown metric {name}")
            continue
        labels = set() if name == "up" else LABELS[base_metric(name)]
        if name.endswith("_bucket"):
            labels = labels | {"le"}
        known |= labels
        for label, (op, value) in matchers.items():
            if label not in labels | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
            elif label in VALUES and "$" not in value:
                literals = [value] if op in ("=", "!=") else value.split("|") if re.fullmatch(r"[\w|]+", value) else []
                unknown = [v for v in literals if v not in VALUES[label]]
                problems += [f"{name}: {label}={v!r} is not one of its values" for v in unknown]
    for group in GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in known:
                problems.append(f"grouped by {label}, which no metric in the expression has")
    return problems


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('sum(rate(flexproxy_requests_total{served_tier="default"}[5m]))', "served_tier='default'"),
        ('sum by (model) (rate(flexproxy_request_duration_seconds_bucket{model=~"$model"}[5m]))', "no label model"),
        ("sum by (client) (rate(flexproxy_upstream_attempts_total[5m]))", "grouped by client"),
        ('rate(flexproxy_requests_total{outcome=~"ok|upstream_timeout"}[5m])', "'upstream_timeout'"),
        ("flexproxy_requests_served_total", "unknown metric"),
    ],
)
def test_the_contract_check_catches_stale_names_labels_and_values(expr: str, problem: str) -> None:
    assert any(problem in found for found in contract_problems(expr)), contract_problems(expr)


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in alerts["groups"] for rule in group["rules"]]


def test_alerts_use_only_the_metrics_labels_and_values_of_the_contract(alert_rules: list[dict[str, Any]]) -> None:
    for rule in alert_rules:
        assert not contract_problems(rule["expr"]), f"{rule['alert']}: {contract_problems(rule['expr'])}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerts_keep_the_labels_that_say_where(alert_rules: list[dict[str, Any]]) -> None:
    """A fleet of sidecars in many namespaces must give distinct, named alerts, not one anonymous sum."""
    for rule in alert_rules:
        expr = rule["expr"]
        assert not re.search(r"\bwithout\b", expr), rule["alert"]
        for clause in re.findall(r"\b(?:sum|max|min|avg|count)\s+by\s*\(([^)]*)\)", expr):
            kept = {label.strip() for label in clause.split(",")}
            assert set(WHERE) <= kept, f"{rule['alert']}: `by ({clause})` drops {set(WHERE) - kept}"
        assert not re.search(r"\b(?:sum|max|min|avg|count)\s*\(", expr), f"{rule['alert']}: aggregates away where"
        # up and process_* are generic names: only the flex-proxy job's series are ours.
        for name, matchers in selectors(expr):
            if not name.startswith("flexproxy_"):
                assert matchers.get("job") == ("=", "flex-proxy"), f"{rule['alert']}: {name} without job"


def test_alerts_catch_a_failing_a_vanished_and_a_starved_proxy(alert_rules: list[dict[str, Any]]) -> None:
    by_name = {rule["alert"]: rule for rule in alert_rules}
    assert 'absent(up{job="flex-proxy"})' in by_name["FlexProxyDown"]["expr"].replace(" ", "")
    assert 'up{job="flex-proxy"}==0' in by_name["FlexProxyDown"]["expr"].replace(" ", "")
    failing = {
        rule["alert"]
        for rule in alert_rules
        for _, m in selectors(rule["expr"])
        if m.get("outcome", ("", ""))[0] in ("=", "=~") and "proxy_error" in m["outcome"][1].split("|")
    }
    assert {"FlexProxyInternalErrors", "FlexProxyRequestsFailing"} <= failing
    # The client's own endings are no failure of the proxy's.
    (share,) = [m["outcome"][1] for _, m in selectors(by_name["FlexProxyRequestsFailing"]["expr"]) if "outcome" in m]
    assert not {"ok", "bad_request", "client_disconnected", "client_deadline"} & set(share.split("|"))
    fds = {name for name, _ in selectors(by_name["FlexProxyFileDescriptorsNearLimit"]["expr"])}
    assert fds == {"process_open_fds", "process_max_fds"}


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_silent(alert_rules: list[dict[str, Any]]) -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in alert_rules:
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        fired = [alert for case in mine for alert in case["exp_alerts"]]
        assert fired, f"{rule['alert']} is never expected to fire"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never expected to stay silent"
        for alert in fired:
            assert alert["exp_labels"]["severity"] == rule["labels"]["severity"]
            assert alert["exp_annotations"]["summary"], rule["alert"]
    down = [alert for case in cases if case["alertname"] == "FlexProxyDown" for alert in case["exp_alerts"]]
    assert any("instance" not in alert["exp_labels"] for alert in down), "every target vanished (absent) fires it"


# --- Grafana ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "dashboards" / "flex-proxy.json").read_text())
    return data


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


FILTERS = ("endpoint", "model", "client")  # dashboard variables named like the label they filter
WHERE_FILTERS = ("job", "namespace", "instance")  # target labels: every selector carries them


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert set(FILTERS + WHERE_FILTERS) <= variables.keys()
    for name in FILTERS + WHERE_FILTERS:
        assert variables[name]["multi"] and variables[name]["includeAll"], name
        assert re.fullmatch(rf"label_values\(flexproxy_[a-z_]+(\{{[^}}]*\}})?, {name}\)", variables[name]["definition"])
    # "All" jobs must stay the flex-proxy jobs: process_* series of every other program share those names.
    assert "allValue" not in variables["job"]
    panels = panels_of(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        xs, ys = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        area = {(x, y) for x in xs for y in ys}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"{panel['id']}_{target['refId']}", target["expr"])
        for panel in panels_of(dashboard)
        for target in panel.get("targets", [])
    ]


def test_dashboard_queries_use_only_exported_metrics_and_cover_them_all(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for ref, expr in dashboard_exprs(dashboard):
        names = {name for name, _ in selectors(expr)}
        assert names and not contract_problems(expr), f"panel target {ref}: {contract_problems(expr)}"
        used |= {base_metric(name) for name in names}
    assert used == METRICS, f"metrics without a panel: {METRICS - used}"
    exprs = [expr for _, expr in dashboard_exprs(dashboard)]
    assert any("increase(flexproxy_cost_saved_usd_total" in e and "[1d]" in e for e in exprs), "saved today"


def test_dashboard_legends_name_labels_the_query_has(dashboard: dict[str, Any]) -> None:
    for panel in panels_of(dashboard):
        for target in panel.get("targets", []):
            labels = set(TARGET_LABELS)
            for name, _ in selectors(target["expr"]):
                labels |= LABELS[base_metric(name)]
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in labels, f"{panel['title']}: legend {{{{{label}}}}}"


def test_dashboard_filters_apply_wherever_the_metric_has_the_label(dashboard: dict[str, Any]) -> None:
    """Each filter narrows every selector whose metric has its label; a panel whose metric lacks the endpoint
    or model label says so instead of silently ignoring the filter."""
    for panel in panels_of(dashboard):
        if panel["type"] == "row":
            continue
        panel_labels: list[set[str]] = []
        for target in panel["targets"]:
            found = selectors(target["expr"])
            target_labels = [LABELS[base_metric(name)] for name, _ in found]
            panel_labels += target_labels
            for name, matchers in found:
                for label in WHERE_FILTERS:
                    assert matchers.get(label) == ("=~", f"${label}"), f"{panel['title']}: {name} lacks ${label}"
            for label in FILTERS:
                everywhere = all(label in labels for labels in target_labels)
                for name, matchers in found:
                    applied = matchers.get(label) == ("=~", f"${label}")
                    # A ratio filtered on one side only would be wrong: all selectors or none.
                    assert applied == everywhere, f"{panel['title']}: {name} and ${label}"
        if any({"endpoint", "model"} & labels for labels in panel_labels):
            for label in ("endpoint", "model"):
                if not all(label in labels for labels in panel_labels):
                    assert f"all {label}s" in panel["description"].lower(), f"{panel['title']}: say ${label} is moot"


@pytest.mark.parametrize(("title", "served"), [("Flex share", ("=", "flex")), ("Fallback rate", ("!=", "flex"))])
def test_flex_share_and_fallback_rate_are_shares_of_flex_eligible_answered_requests(
    dashboard: dict[str, Any], title: str, served: tuple[str, str]
) -> None:
    """The numerator's requests are among the denominator's, so the share never exceeds 100%; an idle window
    divides by nothing, which the `> 0` guard turns into no data rather than NaN."""
    shares = [p for p in panels_of(dashboard) if p["title"].startswith(title)]
    assert len(shares) == 2, "a stat for the range (the exact counter) and a time series by model (the breakdown)"
    for panel in shares:
        (target,) = panel["targets"]
        numerator, denominator = target["expr"].split(" / ")
        assert denominator.startswith("(") and denominator.endswith(" > 0)"), "guarded against dividing by 0"
        ((top, n),) = selectors(numerator)
        ((bottom, d),) = selectors(denominator)
        assert top == bottom
        assert n.pop("served_tier") == served and "served_tier" not in d
        assert n == d, "the same requests above and below the line, less those flex did (or did not) serve"
        assert d["requested_tier"] == ("=", "flex")
        if top == "flexproxy_requests_total":  # the breakdown counts every ending; answered_total only answers
            assert d["outcome"] == ("=", "ok")
        else:
            assert top == "flexproxy_answered_total" and panel["type"] == "stat"


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses every query, with Grafana's variables replaced by sample values."""
    values = {"$__rate_interval": "5m", "$__range": "1d"} | {f"${name}": ".*" for name in FILTERS + WHERE_FILTERS}
    rules = []
    for ref, expr in dashboard_exprs(dashboard):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"panel target {ref}: unknown variable in {expr}"
        rules.append({"record": f"dashboard:target_{ref}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(tool("promtool"), "check", "rules", path)
    assert result.returncode == 0, output(result)


# --- The release workflow and what it publishes ------------------------------------------------------------

WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"


def actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    # shellcheck checks the run: scripts; pyflakes is switched off so the result does not depend on PATH.
    return run(tool("actionlint"), f"-shellcheck={tool('shellcheck')}", "-pyflakes=", path)


def test_actionlint_passes_on_the_release_workflow() -> None:
    result = actionlint(WORKFLOW.relative_to(ROOT))
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("platforms: linux/amd64", "platfroms: linux/amd64", 'input "platfroms" is not defined'),
        ("needs: test", "needs: tests", "needs"),
        ('if [ "$TAG" != "v$version" ]', 'if [ $TAG != "v$version" ]', "SC2086"),
        ("id-token: write", "id-token: writ", "id-token"),
    ],
    ids=["unknown-input", "unknown-job", "shellcheck", "bad-permission"],
)
def test_actionlint_fails_on_a_broken_workflow(tmp_path: Path, old: str, new: str, complaint: str) -> None:
    text = WORKFLOW.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "release.yml"
    path.write_text(text.replace(old, new))
    result = actionlint(path)
    assert result.returncode != 0 and complaint in result.stdout, output(result)


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return data


def steps_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for step in job["steps"] if step.get("uses", "").partition("@")[0] == action]


def test_release_runs_the_tests_on_a_version_tag_before_it_publishes_anything(workflow: dict[str, Any]) -> None:
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert list(triggers) == ["push"] and list(triggers["push"]) == ["tags"]
    assert all(tag.startswith("v") for tag in triggers["push"]["tags"])
    assert workflow["permissions"] == {"contents": "read"}
    jobs = workflow["jobs"]
    test = jobs["test"]
    runs = [step.get("run", "") for step in test["steps"]]
    assert "bash .ci/run" in [run.strip() for run in runs], "the same tests as CI"
    assert any("pyproject.toml" in run and "TAG" in run for run in runs), "the tag must be the project's version"
    assert "permissions" not in test
    needs = {name: job.get("needs", []) for name, job in jobs.items()}
    for publisher in ("pypi", "image"):
        assert "test" in ([needs[publisher]] if isinstance(needs[publisher], str) else needs[publisher]), publisher


def test_release_publishes_the_sdist_and_wheel_to_pypi_by_trusted_publishing(workflow: dict[str, Any]) -> None:
    """`pipx install flex-proxy` works once a tag is pushed: no token, an OIDC identity in a named environment."""
    dist, pypi = workflow["jobs"]["dist"], workflow["jobs"]["pypi"]
    (build,) = [step["run"] for step in dist["steps"] if "python -m build" in step.get("run", "")]
    assert "twine check" in build, "the metadata PyPI will show is checked before the upload"
    (upload,) = steps_using(dist, "actions/upload-artifact")
    assert upload["with"]["path"] == "dist/" and upload["with"]["if-no-files-found"] == "error"
    assert pypi["needs"] == ["test", "dist"]
    assert pypi["permissions"] == {"id-token": "write"}, "trusted publishing, and nothing else"
    assert pypi["environment"]["name"] == "pypi" and pypi["environment"]["url"].endswith("/flex-proxy")
    (download,) = steps_using(pypi, "actions/download-artifact")
    assert download["with"] == {"name": upload["with"]["name"], "path": "dist/"}
    (publish,) = steps_using(pypi, "pypa/gh-action-pypi-publish")
    assert "password" not in publish.get("with", {}), "no token: PyPI trusts this workflow"
    readme = (ROOT / "README.md").read_text()
    assert "pipx install flex-proxy" in readme
    assert "release.yml" in (DEPLOY / "README.md").read_text() and "trusted publisher" in WORKFLOW.read_text()


def test_release_publishes_a_smoke_tested_multi_arch_image(workflow: dict[str, Any]) -> None:
    image = workflow["jobs"]["image"]
    assert image["needs"] == "test" and image["permissions"] == {"contents": "read", "packages": "write"}
    steps = image["steps"]
    (login,) = steps_using(image, "docker/login-action")
    assert login["with"]["registry"] == "ghcr.io"
    builds = steps_using(image, "docker/build-push-action")
    assert [bool(step["with"].get("push")) for step in builds] == [False, True], "a smoke build, then the push"
    smoke = next(i for i, step in enumerate(steps) if "healthz" in step.get("run", ""))
    assert steps.index(builds[0]) < smoke < steps.index(builds[1]), "nothing is published before it answers"
    assert steps.index(builds[1]) > steps.index(login) and steps_using(image, "docker/setup-qemu-action")
    push = builds[1]["with"]
    assert set(push["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert push["tags"] == "${{ steps.meta.outputs.tags }}"
    (meta,) = [step for step in steps if step.get("id") == "meta"]
    assert meta["with"]["images"] == "${{ env.IMAGE }}"
    assert "type=semver,pattern={{version}}" in meta["with"]["tags"], "v0.1.0 publishes 0.1.0, the overlays' tag"


def test_one_image_name_everywhere(workflow: dict[str, Any]) -> None:
    """The workflow publishes, the overlays pull and the READMEs name the same image; a fork changes it by the
    repository variable IMAGE and kustomize's `images:`, as deploy/README.md says."""
    default = re.fullmatch(r"\$\{\{ vars\.IMAGE \|\| '([^']+)' \}\}", workflow["env"]["IMAGE"])
    assert default and default[1] == IMAGE_REPO
    for overlay in ("standalone", "sidecar"):
        images = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())["images"]
        assert [image["newName"] for image in images] == [IMAGE_REPO], overlay
    for path in (ROOT / "README.md", DEPLOY / "README.md", ROOT / "docker-compose.yml", ROOT / "Dockerfile"):
        text = path.read_text()
        named = set(re.findall(r"ghcr\.io/[^\s`:'\")<]+", text))  # a fork's ghcr.io/<owner>/... does not match
        assert named <= {IMAGE_REPO}, f"{path.name} names {named - {IMAGE_REPO}}"
    deploy_readme = (DEPLOY / "README.md").read_text()
    assert IMAGE_REPO in deploy_readme and "kustomize edit set image" in deploy_readme
    assert "variable `IMAGE`" in deploy_readme


def test_the_sdist_and_wheel_carry_every_file_of_the_package(tmp_path: Path) -> None:
    """What the release builds (`python -m build`: the sdist, then the wheel from it) ships every file under
    proxy/ (the price table and anything beside the code), and the installed wheel finds its prices."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "proxy", source / "proxy", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = project["version"]
    shipped = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "proxy").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert "proxy/prices.json" in shipped
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"flex_proxy-{version}.dist-info"
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert shipped <= names, f"not in the wheel: {sorted(shipped - names)}"
    assert not [name for name in names if name.endswith(".pyc") or "__pycache__" in name]
    assert (metadata["Name"], metadata["Version"]) == ("flex-proxy", version)
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["Requires-Python"] == project["requires-python"]
    assert "pipx install flex-proxy" in metadata.get_payload(), "PyPI shows the README"
    assert "flex-proxy = proxy.cli:main" in entry_points
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert shipped | {"pyproject.toml", "README.md", "LICENSE"} <= in_sdist
    # Installed on its own (no editable checkout in the way), the package finds its price table.
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
         "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    probe = "import proxy, proxy.pricing; print(proxy.__file__); print(len(proxy.pricing.PriceTable.load(None).models))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    where, count = result.stdout.split()
    assert where.startswith(str(site)) and int(count) > 0


# --- The proxy itself ---------------------------------------------------------------------------


def test_metric_contract_matches_what_the_proxy_exports() -> None:
    """The names and labels above are what proxy/metrics.py registers, so dashboards and alerts stay truthful."""
    from proxy.metrics import OUTCOMES, STATUS_CLASSES, Metrics

    assert set(OUTCOMES) == VALUES["outcome"] and set(STATUS_CLASSES) == VALUES["status_class"]
    families = list(Metrics().registry.collect())
    exported = {family.name + "_total" if family.type == "counter" else family.name: family for family in families}
    assert {name for name in exported if name.startswith("flexproxy_")} == {
        name for name in METRICS if name.startswith("flexproxy_")
    }
    assert exported.keys() >= METRICS, f"not exported: {METRICS - exported.keys()}"
    for name in METRICS:
        for sample in exported[name].samples:  # the label sets a fresh proxy starts with
            assert set(sample.labels) - {"le"} == LABELS[name], f"{sample.name}{sample.labels}"
            for label, value in sample.labels.items():
                assert label not in VALUES or value in VALUES[label], f"{sample.name}{sample.labels}"


# --- Every query against a real proxy's series -------------------------------------------------

# Counters whose every label set the queries name exists at 0 from the proxy's start, so rate() and increase()
# count the first increment; and those a model family's first request creates at 0, before its first attempt.
FROM_START = {"flexproxy_outcomes_total", "flexproxy_answered_total", "flexproxy_upstream_attempts_total"}
AT_FIRST_SIGHT = {
    "flexproxy_retries_total", "flexproxy_fallbacks_total", "flexproxy_tier_rejections_total",
    "flexproxy_unread_answers_total", "flexproxy_gate_probes_total", "flexproxy_gate_transitions_total",
}  # fmt: skip
RATED = re.compile(r"\b(?:rate|increase)\(\s*([a-z_]+)(\{[^}]*\})?\[")
# A fresh proxy's /metrics: the series above, the pre-created money of the flex families, the process.
FRESH_LINES_MAX = 360
PROXY_WHERE = {"job": "flex-proxy", "namespace": "ai"}


def all_queries(dashboard: dict[str, Any], alert_rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, expression) for every panel target, dashboard variable and alert rule."""
    queries = [(f"panel target {ref}", expr) for ref, expr in dashboard_exprs(dashboard)]
    variables = [v for v in dashboard["templating"]["list"] if "definition" in v]
    queries += [(f"variable {v['name']}", v["definition"]) for v in variables]
    return queries + [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules]


def literal_label_sets(matchers: dict[str, tuple[str, str]]) -> list[dict[str, str]]:
    """Every combination of the literal values a selector asks for (`a|b` once each; variables and negative
    matchers constrain nothing here)."""
    sets: list[dict[str, str]] = [{}]
    for label, (op, value) in matchers.items():
        if "$" in value or op not in ("=", "=~") or not re.fullmatch(r"[\w|.]+", value):
            continue
        sets = [found | {label: choice} for found in sets for choice in value.split("|")]
    return sets


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of every sample a real proxy's /metrics serves."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    families = text_string_to_metric_families(text)
    return [(sample.name, dict(sample.labels), sample.value) for family in families for sample in family.samples]


def matching(samples: list[tuple[str, dict[str, str], float]], name: str, wanted: dict[str, str]) -> list[float]:
    return [value for sample, labels, value in samples if sample == name and wanted.items() <= labels.items()]


def test_a_fresh_proxy_has_every_series_the_queries_rate_at_0(
    make_proxy: Any, sim: Any, dashboard: dict[str, Any], alert_rules: list[dict[str, Any]]
) -> None:
    """rate() and increase() lose the increment that creates a series: every label set a panel or an alert
    rates on the exact counters is there at 0 before the first request, and a family's own series before its
    first attempt; /metrics stays short all the same."""
    proxy = make_proxy()
    fresh = scrape(proxy.url)
    lines = proxy.metrics().splitlines()
    assert len(lines) <= FRESH_LINES_MAX, f"a fresh proxy's /metrics has {len(lines)} lines"
    rated = [(where, name, m) for where, expr in all_queries(dashboard, alert_rules) for name, m in (
        (match[1], {x[1]: (x[2], x[3]) for x in MATCHER.finditer(match[2] or "")}) for match in RATED.finditer(expr)
    )]  # fmt: skip
    checked = 0
    for where, name, matchers in rated:
        if name in FROM_START:
            for wanted in literal_label_sets(matchers):
                values = matching(fresh, name, wanted)
                assert values and set(values) == {0.0}, f"{where}: no {name}{wanted} at 0 on a fresh proxy"
                checked += 1
    assert checked >= 20
    assert matching(fresh, "flexproxy_outcomes_total", {"outcome": "auth_failed"})
    assert matching(fresh, "flexproxy_outcomes_total", {"endpoint": "other", "outcome": "shutdown"}) == [0.0]
    assert not any(name in AT_FIRST_SIGHT for name, _, _ in fresh), "no family's own series before it is seen"

    proxy.client().chat.completions.create(model="o3", messages=[{"role": "user", "content": "hi"}])
    seen = scrape(proxy.url)
    for where, name, matchers in rated:
        if name in AT_FIRST_SIGHT:
            for wanted in literal_label_sets(matchers):
                values = matching(seen, name, wanted | {"model": "o3"})
                assert values and set(values) == {0.0}, f"{where}: no {name}{wanted} for o3 at its first request"
    for name, labels in [
        ("flexproxy_retries_total", {"endpoint": "chat", "reason": "flex_unavailable"}),
        ("flexproxy_retries_total", {"endpoint": "chat", "reason": "connection"}),
        ("flexproxy_fallbacks_total", {"endpoint": "chat"}),
        ("flexproxy_tier_rejections_total", {"endpoint": "chat"}),
        ("flexproxy_unread_answers_total", {"endpoint": "chat", "tier": "flex"}),
        ("flexproxy_gate_transitions_total", {"to": "busy"}),
        ("flexproxy_gate_probes_total", {"result": "ok"}),
        ("flexproxy_gate_busy", {}),
    ]:
        assert matching(seen, name, labels | {"model": "o3"}) == [0.0], (name, labels)
    # Only where the family was seen: /metrics does not fill up with every endpoint of every model.
    assert not matching(seen, "flexproxy_retries_total", {"endpoint": "responses"})
    assert not matching(seen, "flexproxy_retries_total", {"model": "gpt-5"})
    assert matching(seen, "flexproxy_answered_total", {"endpoint": "chat", "requested_tier": "flex",
                                                        "served_tier": "flex"}) == [1.0]  # fmt: skip
    assert matching(seen, "flexproxy_outcomes_total", {"endpoint": "chat", "outcome": "ok"}) == [1.0]


def _promtool_series(samples: list[tuple[str, dict[str, str], float]], where: dict[str, str], busy: bool) -> list[
    dict[str, str]
]:
    """promtool input series from scraped samples: counters rising by 1 a minute (busy) or flat at 0 (idle),
    gauges at the value scraped, each with the target labels Prometheus would add."""
    series = []
    for name, labels, value in samples:
        counter = name.endswith(("_total", "_bucket", "_count", "_sum"))
        text = ", ".join(f"{key}={json.dumps(val)}" for key, val in sorted((labels | where).items()))
        values = ("0+1x40" if busy else "0x40") if counter else f"{value:g}x40"
        series.append({"series": f"{name}{{{text}}}", "values": values})
    return series


def test_every_query_runs_on_the_series_of_real_proxies(
    make_proxy: Any, sim: Any, dashboard: dict[str, Any], alert_rules: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Every panel, variable and alert query names only metrics and label values real proxies export (one
    keyed, one in shadow mode, after a little traffic), and promtool evaluates each on their series: with
    traffic, every panel has data and none is NaN; idle, no panel is NaN and no alert fires."""
    from proxy.sim import Reply

    messages = [{"role": "user", "content": "hi"}]
    keyed = make_proxy(api_key="sk-proxy-secret", client_keys=("web ck-web-0123",))
    client = keyed.client(api_key="ck-web-0123")
    sim.script(Reply())  # on flex
    client.chat.completions.create(model="o3", messages=messages)  # type: ignore[arg-type]
    sim.script(Reply(kind="flex_429"), Reply())  # the gate goes busy; this request goes to standard at once
    fall_back = keyed.client(api_key="ck-web-0123", default_headers={"X-Flex-On-Unavailable": "standard"})
    assert fall_back.chat.completions.create(model="o3", messages=messages).service_tier == "default"  # type: ignore[arg-type]
    sim.script(Reply(kind="flex_429"), Reply())  # a request that waits in the busy gate, then gets flex
    client.chat.completions.create(model="o3", messages=messages)  # type: ignore[arg-type]
    sim.script(Reply(kind="server_error"), Reply())  # a retry after a backoff
    client.responses.create(model="gpt-5", input="hi")
    sim.script(Reply())
    client.chat.completions.create(model="gpt-9-preview", messages=messages)  # type: ignore[arg-type]  # unpriced
    with pytest.raises(Exception, match="401"):
        keyed.client(api_key="ck-wrong").chat.completions.create(model="o3", messages=messages)  # type: ignore[arg-type]
    shadow = make_proxy(mode="shadow")
    sim.script(Reply())
    shadow.client().chat.completions.create(model="o3", messages=messages)  # type: ignore[arg-type]
    samples = {"keyed": scrape(keyed.url), "shadow": scrape(shadow.url)}
    exported = {name for found in samples.values() for name, _, _ in found}

    queries = all_queries(dashboard, alert_rules)
    for where, expr in queries:
        for name, _ in selectors(expr):
            assert name == "up" or name in exported, f"{where}: {name} is not exported by the proxy"
    values = {"$__rate_interval": "5m", "$__range": "1h"} | {f"${name}": ".*" for name in FILTERS + WHERE_FILTERS}

    def concrete(expr: str) -> str:
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        return expr

    def has_data(expr: str) -> dict[str, Any]:
        return {"expr": f"(count(({expr})) > bool 0) or vector(0)", "eval_time": "30m", "exp_samples": [{"value": 1}]}

    def no_nan(expr: str) -> dict[str, Any]:
        return {"expr": f"count(({expr}) != ({expr})) or vector(0)", "eval_time": "30m", "exp_samples": [{"value": 0}]}

    panels = [concrete(expr) for _, expr in dashboard_exprs(dashboard)]
    alerts = [rule["expr"] for rule in alert_rules]
    selected = sorted({concrete(m[0]) for _, expr in queries for m in SELECTOR.finditer(expr) if m[1] != "up"})
    tests = []
    for busy in (True, False):
        series = [{"series": f'up{{instance="{name}:8080", job="flex-proxy", namespace="ai"}}', "values": "1x40"}
                  for name in samples]  # fmt: skip
        for name, found in samples.items():
            series += _promtool_series(found, PROXY_WHERE | {"instance": f"{name}:8080", "pod": name}, busy)
        checks = [no_nan(expr) for expr in panels + alerts]
        if busy:
            checks += [has_data(expr) for expr in panels + selected]
        test: dict[str, Any] = {"name": "busy" if busy else "idle", "interval": "1m", "input_series": series,
                                "promql_expr_test": checks}  # fmt: skip
        if not busy:
            test["alert_rule_test"] = [{"eval_time": "30m", "alertname": rule["alert"], "exp_alerts": []}
                                       for rule in alert_rules]  # fmt: skip
        tests.append(test)
    path = tmp_path / "queries_test.yml"
    rules = (DEPLOY / "prometheus" / "alerts.yml").resolve()
    path.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}))
    result = run(tool("promtool"), "test", "rules", path)
    assert result.returncode == 0, output(result)[-6000:]
