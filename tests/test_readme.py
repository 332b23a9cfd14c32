"""The README as a newcomer reads it: its commands, its settings table, its one-minute quick start run as written."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tools import find, need

from proxy.config import Settings
from proxy.sim.cli import build_parser, options_from
from proxy.sim.options import window_busy

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI_RUN = (ROOT / ".ci" / "run").read_text()
QUICK_START_PORTS = (8080, 8081)
QUICK_START_TIMEOUT_S = 150


def test_the_two_commands_are_the_ones_ci_runs() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    assert blocks[0].strip() == "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/flex-proxy"
    assert blocks[1].strip() == "bash .ci/run"
    assert "python -m pytest" in CI_RUN


def test_the_readme_names_every_package_ci_installs() -> None:
    """`want COMMAND PACKAGE...` lines in .ci/run, against the paragraph under the test command."""
    wanted = re.findall(r"^want (\S+) ([^#\n]+)", CI_RUN, re.M)
    assert {command for command, _ in wanted} >= {"promtool", "nginx", "wrk", "shellcheck", "curl"}
    said = README[README.index("bash .ci/run\n```") : README.index("## Try it in a minute")]
    for command, packages in wanted:
        for package in packages.split():
            assert f"`{package}`" in said, f".ci/run installs {package} for {command}; the README does not say so"
    assert "`python3-venv`" in said and "python3-venv" in CI_RUN
    assert "sudo" in said and "sudo" in CI_RUN


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


def quick_start() -> str:
    """The README's one-minute block, exactly as a reader would paste it."""
    section = README[README.index("## Try it in a minute") :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no sh block under 'Try it in a minute'"
    return match.group(1)


def test_the_simulator_defaults_are_what_the_quick_start_says() -> None:
    """30% of 5-second windows, and the default seed's first busy windows 5-10 s and 15-20 s after the start."""
    options = options_from(build_parser().parse_args([]))
    assert (options.flex_busy_share, options.burst_s, options.busy_period_s) == (0.3, 5.0, 0.0)
    busy = [window_busy(options.seed, window, options.flex_busy_share) for window in range(4)]
    assert busy == [False, True, False, True]
    assert "busy in 30% of 5-second windows" in README and "first busy windows are 5-10 s and 15-20 s" in README
    # The same seed keeps the advertised share over a long run.
    share = sum(window_busy(options.seed, w, options.flex_busy_share) for w in range(20_000)) / 20_000
    assert 0.28 < share < 0.32


def _private_network() -> list[str] | None:
    """A command prefix that runs in a network namespace of its own, with its own loopback, so the block's fixed
    ports (8080, 8081) cannot meet another process's; None where this machine does not allow one."""
    unshare, ip = find("unshare"), find("ip")
    if unshare is None or ip is None:
        return None
    up = f'{shlex.quote(ip)} link set lo up && exec "$@"'
    prefix = [unshare, "--net", "--map-root-user", "--", "bash", "-c", up, "-"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30, check=False)
    return prefix if probe.returncode == 0 else None


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _metric(output: str, name: str) -> float:
    match = re.search(rf'^{name}\{{[^}}]*model="o3"[^}}]*\}} (\S+)$', output, re.M)
    assert match, f"no {name} line for o3 in the output:\n{output}"
    return float(match.group(1))


def test_quick_start_as_written_shows_flex_a_gate_wait_a_fallback_and_the_saving(tmp_path: Path) -> None:
    """The block runs literally, in a directory whose .venv is this test run's virtualenv, and must show what the
    README says it shows; it leaves nothing running."""
    need("curl")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "flex-proxy").exists():
        pytest.skip(f"the quick start runs .venv/bin/flex-proxy: run the tests from the project's virtualenv ({venv})")
    (tmp_path / ".venv").symlink_to(venv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEX_PROXY_", "OPENAI_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"  # the openai line finds the SDK installed; pip need not ask PyPI
    prefix = _private_network()
    if prefix is None:
        busy = [port for port in QUICK_START_PORTS if not _port_is_free(port)]
        if busy:
            pytest.skip(f"ports {busy} are in use and this machine allows no private network namespace (unshare)")
        prefix = []
    process = subprocess.Popen(
        [*prefix, "bash", "-c", quick_start()], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=QUICK_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the quick start did not finish within {QUICK_START_TIMEOUT_S} s:\n{output}")
    finally:
        leftovers = _still_running(process.pid)
    assert not leftovers, "the quick start left processes running"
    assert process.returncode == 0, output
    assert "Traceback" not in output, output

    answers = re.findall(r"^(\S+) +after (\d+) attempt\(s\), (\d+\.\d) s$", output, re.M)
    assert len(answers) == 30, output
    assert ("flex", "1") in {(tier, attempts) for tier, attempts, _ in answers}, "answers on flex at once"
    fallbacks = [answer for answer in answers if answer[0] == "default"]
    assert fallbacks, f"no fallback to the standard tier:\n{output}"
    # What the README says of them: they waited for flex (about 4 s, as its deadline allowed), then went standard.
    assert any(float(seconds) >= 2 for _, _, seconds in fallbacks), f"no fallback after a wait:\n{output}"
    assert _metric(output, "flexproxy_gate_wait_seconds_count") > 0, "no request waited in the gate"
    assert _metric(output, "flexproxy_fallbacks_total") == len(fallbacks)
    assert _metric(output, "flexproxy_cost_saved_usd_total") > 0
    assert _metric(output, "flexproxy_savings_lost_usd_total") > 0


def _still_running(group: int, wait_s: float = 10.0) -> bool:
    """Whether the block's process group outlives it; killed if so."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    os.killpg(group, signal.SIGKILL)
    return True
