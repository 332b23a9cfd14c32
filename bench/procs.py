"""Start, watch and stop the processes a scenario needs: the proxy, the simulator, nginx.

Every process is started through `bench.nofile` (soft open-files limit raised to the hard one), writes its
output to a log file in the results folder, and is stopped by its own pid when the scenario ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This environment without FLEX_PROXY_* settings, so only the scenario's own settings apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}


def flex_proxy_command() -> list[str]:
    """The `flex-proxy` console script beside this interpreter, else `python -m proxy`."""
    script = Path(sys.executable).parent / "flex-proxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


@dataclass
class Usage:
    """Memory and CPU of one process, read from /proc."""

    rss_mb: float
    hwm_mb: float  # peak resident set size since the process started
    cpu_s: float  # user + system


def usage(pid: int) -> Usage:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(after_name[11]) + int(after_name[12])) / _TICKS  # utime, stime
    return Usage(_kb(fields["VmRSS"]) / 1024, _kb(fields["VmHWM"]) / 1024, cpu)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its direct children (an nginx master and its worker)."""
    total = usage(pid).cpu_s
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            total += usage(int(child)).cpu_s
    return total


def _kb(value: str) -> float:
    return float(value.split()[0])


class Service:
    """One child process with a readiness URL (or check); `with Service(...) as svc:` starts and stops it."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, ready_url: str | None, *, port: int = 0,
                 env: Mapping[str, str] | None = None, nofile: bool = True,
                 ready: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.name = name
        self.port = port
        self.argv = [sys.executable, "-m", "bench.nofile", "--", *argv] if nofile else argv
        self.log_path = log_dir / f"{name}.log"
        self.ready_url = ready_url
        self.ready = ready if ready is not None else (lambda: _answers_200(ready_url)) if ready_url else None
        self.env = dict(env) if env is not None else clean_env()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Service:
        self.spawn()
        self.wait_ready()
        return self

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        if self.ready is None:
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {START_TIMEOUT_S}s: {self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal our own child by pid, wait, and kill it if it does not go."""
        self.signal(sig)
        self.wait_stopped()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_stopped(self) -> None:
        """Wait for a signalled child to go; kill it if it does not within STOP_TIMEOUT_S."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers_200(url: str) -> bool:
    with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(url, timeout=1) as answer:
        return bool(answer.status == 200)
    return False


def proxy(log_dir: Path, upstream: str, name: str = "flex-proxy", **settings: object) -> Service:
    """flex-proxy on a free port in front of `upstream` (a base URL ending in /v1); `settings` as flags. Settings
    read from the environment only (such as the shared state's URL) go in the service's `env` before it starts."""
    port = free_port()
    argv = [*flex_proxy_command(), "--host", "127.0.0.1", "--port", str(port), "--upstream-base-url", upstream]
    settings.setdefault("log_level", "warning")
    for key, value in settings.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return Service(name, argv, log_dir, f"http://127.0.0.1:{port}/healthz", port=port)


def simulator(log_dir: Path, name: str = "simulator", **flags: object) -> Service:
    """`flex-proxy simulate` on a free port; `flags` as its command-line options."""
    port = free_port()
    argv = [*flex_proxy_command(), "simulate", "--port", str(port)]
    for key, value in flags.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return Service(name, argv, log_dir, f"http://127.0.0.1:{port}/_sim/stats", port=port)


@contextlib.contextmanager
def running(*services: Service) -> Iterator[None]:
    """Start the services in order and stop them in reverse, whatever happens in between."""
    started: list[Service] = []
    try:
        for service in services:
            service.start()
            started.append(service)
        yield
    finally:
        for service in reversed(started):
            service.stop()


@contextlib.contextmanager
def running_together(services: Sequence[Service]) -> Iterator[None]:
    """Start the services all at once (a fleet of proxies starts in the time of one), wait until each is
    ready, and stop them all, whatever happens in between."""
    spawned: list[Service] = []
    try:
        for service in services:
            service.spawn()
            spawned.append(service)
        for service in services:
            service.wait_ready()
        yield
    finally:
        for service in spawned:  # all drain at once
            service.signal()
        for service in spawned:
            service.wait_stopped()
