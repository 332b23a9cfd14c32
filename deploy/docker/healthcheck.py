"""Container health probe: exit 0 when the proxy's /healthz answers 200, 1 otherwise.

Usage: python healthcheck.py [URL]; without URL it probes the port in FLEX_PROXY_PORT on loopback.
"""

import os
import sys
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def default_url() -> str:
    host = os.environ.get("FLEX_PROXY_HOST", "127.0.0.1")
    if host in WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{os.environ.get('FLEX_PROXY_PORT', '8080')}/healthz"


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else default_url()
    # An empty ProxyHandler: HTTP(S)_PROXY may be set for the upstream, never for this local probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError, HTTPError (non-2xx) and timeouts are all OSError
        print(f"healthcheck {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
