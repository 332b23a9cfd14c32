"""Demo traffic for `docker compose --profile demo`: a few chat requests a second through the proxy.

Stdlib only, so it runs in the flex-proxy image. Stops after --requests if given, else runs until stopped.
"""

import argparse
import json
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request


def send(base_url: str, api_key: str, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=900) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def worker(args: argparse.Namespace, remaining: list[int], lock: threading.Lock) -> None:
    while True:
        with lock:
            if remaining[0] == 0:
                return
            remaining[0] -= 1
        status = send(random.choice(args.base_url), args.api_key, random.choice(args.models))
        print(f"status={status}", flush=True)
        time.sleep(random.uniform(0, 2 * args.pause))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    # Several: each request goes to one of them at random (the demo's two replicas share their state).
    parser.add_argument("--base-url", nargs="+", default=["http://127.0.0.1:8080/v1"])
    parser.add_argument("--api-key", default="demo")
    parser.add_argument("--models", nargs="+", default=["gpt-5-mini", "o4-mini", "gpt-5"])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--pause", type=float, default=1.0, help="mean seconds between a worker's requests")
    parser.add_argument("--requests", type=int, default=-1, help="total requests; -1 runs until stopped")
    args = parser.parse_args(argv)
    # As PID 1 in a container, SIGTERM is ignored unless handled: exit promptly on `docker compose stop`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    remaining, lock = [args.requests], threading.Lock()
    threads = [threading.Thread(target=worker, args=(args, remaining, lock)) for _ in range(args.workers)]
    for thread in threads:
        thread.daemon = True  # SIGTERM's exit must not wait for a request held in flex backoff
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
