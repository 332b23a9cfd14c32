"""`flex-proxy simulate` / `python -m proxy.sim`: run the simulated upstream until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import os
import socket
import textwrap

from aiohttp import web

from .app import create_sim_app
from .options import SimOptions
from .simulator import Simulator

DEMO_SEED = 198


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once (a help text that already says its default keeps its own words); wraps at spaces
    only, so flags such as --flex-busy stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flex-proxy simulate",
        description="A fake OpenAI API with flex behaviour, to try flex-proxy without an OpenAI key.",
        formatter_class=_Formatter,
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--port", type=int, default=8081, help="port to listen on")
    # Demo defaults: flex is busy in about a third of 5 s windows, and answers are quick but not instant.
    add("--flex-busy", type=float, default=0.3, help="share of time windows in which flex is busy, drawn at random")
    add("--burst-s", type=float, default=5.0, help="length of one capacity window, in seconds")
    add("--busy-reject", type=float, default=1.0, help="share of flex requests refused in a busy window")
    add("--busy-period-s", type=float, default=0.0, help="a fixed pattern besides the random windows of --flex-busy "
        "(add --flex-busy 0 for the pattern alone): flex busy for the first --busy-for-s of every period of this many "
        "seconds, counted from the start or the last /_sim/reset (0: no pattern)")  # fmt: skip
    add("--busy-for-s", type=float, default=0.0, help="with --busy-period-s: how long flex is busy in each period")
    add("--rate-limit", type=float, default=0.0, help="share of requests answered 429 rate_limit_exceeded")
    add("--rate-limit-retry-ms", type=int, default=200, help="retry-after-ms sent with rate-limit 429s")
    add("--errors", type=float, default=0.0, help="share of requests answered 500/503")
    add("--latency-standard", type=float, default=0.2, help="seconds before answering on the standard tier")
    add("--latency-flex", type=float, default=0.6, help="seconds before answering on flex")
    add("--stream-events", type=int, default=8, help="content delta events in a stream")
    add("--event-interval", type=float, default=0.05, help="seconds between stream events")
    add("--cached-share", type=float, default=0.0, help="share of prompt tokens reported as cached")
    # The default seed's draw puts busy windows 5-10 s and 15-20 s after the start (then 30-35 s, 50-55 s, ...), so
    # the README's quick start, which starts sending a second or two after the simulator, meets flex busy.
    add("--seed", type=int, default=DEMO_SEED, help="seed of the busy windows and random draws (the default's "
        "windows: flex busy 5-10 s and 15-20 s after the start)")  # fmt: skip
    add("--api-key", default=None, help="accept only 'Bearer <key>' (default: accept any)")
    return parser


def options_from(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        flex_busy_share=args.flex_busy,
        burst_s=args.burst_s,
        busy_reject_share=args.busy_reject,
        busy_period_s=args.busy_period_s,
        busy_for_s=args.busy_for_s,
        rate_limit_share=args.rate_limit,
        rate_limit_retry_ms=args.rate_limit_retry_ms,
        error_share=args.errors,
        latency_standard_s=args.latency_standard,
        latency_flex_s=args.latency_flex,
        stream_events=args.stream_events,
        event_interval_s=args.event_interval,
        cached_share=args.cached_share,
        seed=args.seed,
        api_key=args.api_key,
    )


def listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so a busy port is one line rather than a traceback from inside the server."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=4096)
    except OSError as exc:
        # create_server re-raises with the address in strerror; name lookups (gaierror) have negative numbers.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
        raise SystemExit(f"flex-proxy simulate: cannot listen on {host}:{port}: {reason.lower()}") from None


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, serve until a signal, return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]  # the real one, when --port 0 let the system choose
    url = f"http://[{args.host}]:{port}" if ":" in args.host else f"http://{args.host}:{port}"
    line = (
        f"flex-proxy simulate: fake OpenAI upstream listening on {url}/v1 "
        f"(point the proxy at it with FLEX_PROXY_UPSTREAM_BASE_URL={url}/v1)"
    )

    def announce(_banner: str) -> None:
        # run_app calls this once the socket is bound, so the line also means "ready".
        print(line, flush=True)

    web.run_app(
        create_sim_app(Simulator(options)),
        sock=sock,
        access_log=None,
        print=announce,
        backlog=4096,
        handler_cancellation=True,
        shutdown_timeout=1.0,
    )
    return 0
