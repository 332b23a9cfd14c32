"""A throwaway `redis-server` for the fleet scenario: loopback, a free port, no persistence; its version and
its INFO counters read over a plain socket (the harness needs no Redis client of its own); and whether a proxy
says it is using it."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from . import load
from .procs import Service, free_port

APT_PACKAGE = "redis-server"
STATE_URL = "FLEX_PROXY_STATE_URL"  # the proxy reads it from the environment only (it may hold a password)
_SHARED_UP = re.compile(r"^flexproxy_shared_state_up(?:\{[^}]*\})? ([\d.e+-]+)$", re.MULTILINE)
SHARED_UP_WAIT_S = 5.0


def binary() -> str:
    found = shutil.which("redis-server") or next((p for p in ("/usr/bin/redis-server",) if Path(p).exists()), None)
    if found is None:
        raise SystemExit(f"bench: redis-server not found; install it (Debian: apt-get install {APT_PACKAGE})")
    return found


def version() -> str:
    """`redis-server --version` as "7.0.15" (the v= field), or its first line if it has none."""
    out = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=False, timeout=10)
    text = (out.stdout or out.stderr).strip()
    found = re.search(r"\bv=(\S+)", text)
    return found.group(1) if found else text.splitlines()[0] if text else "unknown"


def command(port: int, *args: str, timeout_s: float = 2.0) -> bytes:
    """Send one inline command and return the raw reply (a status line or one bulk string)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(" ".join(args).encode() + b"\r\n")
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
            if _complete(reply):
                break
    return reply


def _complete(reply: bytes) -> bool:
    if not reply.endswith(b"\r\n"):
        return False
    if not reply.startswith(b"$"):
        return True  # +OK, -ERR, :1: one line
    head, _, rest = reply.partition(b"\r\n")
    size = int(head[1:])
    return size < 0 or len(rest) >= size + 2


def ping(port: int) -> bool:
    try:
        return command(port, "PING", timeout_s=1.0).startswith(b"+PONG")
    except OSError:
        return False


def info(port: int, section: str = "stats") -> dict[str, str]:
    """INFO `section` as a dict of its `name:value` lines."""
    text = command(port, "INFO", section).decode(errors="replace")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def commands_processed(port: int) -> int:
    """Every command Redis has served since it started (INFO stats total_commands_processed)."""
    return int(info(port)["total_commands_processed"])


def server(log_dir: Path, name: str = "redis") -> Service:
    """redis-server on a free loopback port, no RDB snapshots and no append-only file, so nothing outlives it."""
    port = free_port()
    argv = [binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "yes", "--dir", str(log_dir)]  # fmt: skip
    return Service(name, argv, log_dir, None, port=port, nofile=False, ready=lambda: ping(port))


def url(service: Service) -> str:
    return f"redis://127.0.0.1:{service.port}/0"


def shared_state_up(metrics_text: str) -> float | None:
    """The proxy's `flexproxy_shared_state_up` gauge, or None when it has no such metric (no shared state)."""
    found = _SHARED_UP.search(metrics_text)
    return float(found.group(1)) if found else None


def wait_shared_up(ports: list[int], limit_s: float = SHARED_UP_WAIT_S) -> list[float | None]:
    """Each proxy's shared-state gauge once all read 1 or `limit_s` has passed (a proxy with no such gauge is
    not waited for): the load must not start while a proxy is still in local mode."""
    deadline = time.monotonic() + limit_s
    while True:
        values = [shared_state_up(load.get_text(f"http://127.0.0.1:{port}/metrics")) for port in ports]
        if all(v is None or v >= 1 for v in values) or time.monotonic() > deadline:
            return values
        time.sleep(0.1)
