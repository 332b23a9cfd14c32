"""`python -m bench.inproc PORT [N] [--concurrency C] [--stream] [--tree DIR]`: the /v1 pipeline in process, no server.

N chat requests go through the proxy's own ASGI app (no uvicorn) to an upstream on 127.0.0.1:PORT (the canned nginx
of `bench.nginx`, or the simulator for `--stream`); it prints the CPU µs a request. Run under
`valgrind --tool=callgrind` at two values of N, the difference of the instruction counts over the difference of N
is the instructions a request: repeatable to ~0.3% with `--concurrency 1` and PYTHONHASHSEED=0, where wrk's
requests/s swing by 10% on a shared machine. `--tree` runs another checkout's proxy/ (A/B).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path
from typing import Any

from .plan import SMALL_CHAT_BODY

STREAM_BODY = '{"model":"o3","stream":true,"messages":[{"role":"user","content":"hi"}]}'
WARM_UP = 3  # requests per worker before counting: connections open, caches warm


async def one(app: Any, body: bytes) -> None:
    """One request through the app, answered 200, the way uvicorn would drive it."""
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"authorization", b"Bearer x"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 50000), "http_version": "1.1",
             "scheme": "http", "root_path": ""}  # fmt: skip
    done = asyncio.Event()
    status: list[int] = []
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif not message.get("more_body"):
            done.set()

    await app.proxy(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"the proxy answered {status}")


async def run(port: int, count: int, concurrency: int, stream: bool) -> float:
    from proxy.app import create_app
    from proxy.config import Settings

    app = create_app(Settings(upstream_base_url=f"http://127.0.0.1:{port}/v1", log_level="warning"))
    body = (STREAM_BODY if stream else SMALL_CHAT_BODY).encode()
    await app.services.upstream.start()

    async def worker(requests: int) -> None:
        for _ in range(requests):
            await one(app, body)

    try:
        await asyncio.gather(*(worker(WARM_UP) for _ in range(concurrency)))
        gc.collect()
        gc.freeze()
        gc.set_threshold(2_000, 10, 10)  # as `flex-proxy` runs
        start = time.process_time()
        await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
        return (time.process_time() - start) / (count // concurrency * concurrency)
    finally:
        await app.services.upstream.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int, nargs="?", default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--stream", action="store_true", help="a chat stream whose usage the proxy asks for")
    parser.add_argument("--tree", type=Path, help="a checkout whose proxy/ to run")
    args = parser.parse_args(argv)
    if args.tree is not None:
        sys.path.insert(0, str(args.tree))
    import uvloop

    seconds = uvloop.run(run(args.port, args.count, args.concurrency, args.stream))
    print(f"{seconds * 1e6:.1f} µs CPU a request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
