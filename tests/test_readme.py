"""The README as a newcomer reads it: its commands, its settings table, its one-minute quick start."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from proxy.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def test_the_two_commands_are_the_ones_ci_runs() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    assert blocks[0].strip() == "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/flex-proxy"
    assert blocks[1].strip() == "bash .ci/run"
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_in_the_table_with_its_default() -> None:
    for name, field in Settings.model_fields.items():
        row = re.search(rf"^\| `FLEX_PROXY_{name.upper()}` \| ([^|]+) \|", README, re.M)
        assert row, f"FLEX_PROXY_{name.upper()} is missing from the README"
        default = field.default
        if isinstance(default, bool):
            assert row.group(1).strip() == f"`{str(default).lower()}`"
        elif isinstance(default, int | float | str):
            shown = row.group(1).strip().strip("`")
            assert shown == str(default) or (not isinstance(default, str) and shown == f"{default:g}")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def test_quick_start_without_a_key(tmp_path: Path) -> None:
    """The README's quick start, on free ports: simulator, proxy in front of it, the SDK, then /metrics."""
    sim_port, proxy_port = _port(), _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEX_PROXY_", "OPENAI_"))}
    simulator = subprocess.Popen(
        [BIN / "flex-proxy", "simulate", "--port", str(sim_port), "--burst-s", "0.5", "--latency-flex", "0.1"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proxy_env = env | {"FLEX_PROXY_UPSTREAM_BASE_URL": f"http://127.0.0.1:{sim_port}/v1"}
    proxy = subprocess.Popen(
        [BIN / "flex-proxy", "--port", str(proxy_port), "--backoff-initial-s", "0.05", "--backoff-max-s", "0.2"],
        env=proxy_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(f"http://127.0.0.1:{sim_port}/_sim/stats")
        _wait(f"http://127.0.0.1:{proxy_port}/healthz")
        with openai.OpenAI(base_url=f"http://127.0.0.1:{proxy_port}/v1", api_key="sk-demo", max_retries=0) as client:
            tiers = [
                client.chat.completions.create(model="o3", messages=[{"role": "user", "content": "hi"}]).service_tier
                for _ in range(20)
            ]
        assert set(tiers) <= {"flex", "default"} and "flex" in tiers
        metrics = httpx.get(f"http://127.0.0.1:{proxy_port}/metrics").text
        saved = re.search(r'^flexproxy_cost_saved_usd_total\{client="default",model="o3"\} (\S+)$', metrics, re.M)
        assert saved and float(saved.group(1)) > 0
    finally:
        for process in (proxy, simulator):
            process.send_signal(signal.SIGTERM)
            process.wait(15)
