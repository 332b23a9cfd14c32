"""nginx references, each from a generated config in a temp dir: a canned upstream and a plain relay.

The canned server answers every path with one fixed chat.completion (the fastest possible upstream). Under
/body/ it first reads the whole request body and only then answers, so a large upload is really received
before the answer starts (a bare `return` would answer while still discarding the upload).
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from pathlib import Path

from .procs import Service, free_port

APT_PACKAGES = "nginx-light wrk"  # Debian/Ubuntu packages that provide /usr/sbin/nginx and /usr/bin/wrk

CANNED_ANSWER = {
    "id": "chatcmpl-bench0000000000000000000000",
    "object": "chat.completion",
    "created": 1767225600,
    "model": "o3-2025-04-16",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I help you today?",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 8,
        "completion_tokens": 18,
        "total_tokens": 26,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "flex",
    "system_fingerprint": None,
}

_COMMON = """daemon off;
master_process on;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    client_max_body_size 20m;
{body}
}}
"""

_CANNED = """    upstream canned_self {{ server 127.0.0.1:{port}; keepalive 16; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{answer}';
        }}
        location /body/ {{
            client_body_buffer_size 20m;
            proxy_pass http://canned_self/canned/;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""

_RELAY = """    upstream canned {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://canned;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def binary() -> str:
    """The nginx executable; a missing one is an error naming the packages to install."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        raise SystemExit(f"bench: nginx not found; install it (Debian: apt-get install {APT_PACKAGES})")
    return found


def canned_answer_text() -> str:
    text = json.dumps(CANNED_ANSWER, separators=(",", ":"))
    assert "'" not in text and "$" not in text and "\\" not in text  # would need nginx string escaping
    return text


class Nginx(Service):
    """One nginx master (worker_processes 1, daemon off) from a generated config in its own temp dir."""

    def __init__(self, name: str, body: str, port: int, log_dir: Path) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.prefix.chmod(0o755)  # workers run as an unprivileged user when the master is root
        conf = self.prefix / "nginx.conf"
        conf.write_text(_COMMON.format(prefix=self.prefix, body=body))
        argv = [binary(), "-c", str(conf), "-p", str(self.prefix), "-e", str(self.prefix / "error.log")]
        super().__init__(name, argv, log_dir, f"http://127.0.0.1:{port}/healthz", port=port, nofile=False)

    def stop(self, sig: int = signal.SIGQUIT) -> None:
        """Graceful stop of the master (it takes its worker with it), then remove the temp dir."""
        try:
            super().stop(sig)
        finally:
            shutil.rmtree(self.prefix, ignore_errors=True)


def canned(log_dir: Path) -> Nginx:
    port = free_port()
    return Nginx("nginx-canned", _CANNED.format(port=port, answer=canned_answer_text()), port, log_dir)


def relay(log_dir: Path, upstream_port: int) -> Nginx:
    port = free_port()
    return Nginx("nginx-relay", _RELAY.format(port=port, upstream=upstream_port), port, log_dir)


def version() -> str:
    import subprocess

    out = subprocess.run([binary(), "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")
