"""The `flex-proxy` command: read settings once, then serve (or run the simulated upstream)."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import errno
import gc
import logging
import math
import os
import signal
import socket
import sys
import textwrap
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, NoReturn, Union, get_args, get_origin
from urllib.parse import urlsplit

import uvicorn
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

from .config import Settings, where
from .logs import LOGGER, configure, text_value
from .policies import PolicyFileError, check_file
from .pricing import PriceTable
from .wire import HttpProtocol

DESCRIPTION = "Reverse proxy for the OpenAI API that sends eligible requests on the flex tier."
# The sub-commands, as `--help` lists them; without one, `flex-proxy` runs the proxy.
COMMANDS = (
    ("simulate [OPTIONS]", "a simulated OpenAI upstream, to try the proxy without a key (flex-proxy simulate --help)"),
    ("check-policy FILE", "validate a policy file without starting anything (flex-proxy check-policy --help)"),
    ("report --url URL", "a running proxy's cost and savings in the terminal (flex-proxy report --help)"),
)
PREFIX = "FLEX_PROXY_"
BACKLOG = 4096
# The dated-snapshot glob the default model list pairs with each family; shown once instead of 14 times.
_DATED = "-20[0-9][0-9]-[0-9][0-9]-[0-9][0-9]"
# Variables Kubernetes injects for a Service named flex-proxy when service links are on (deploy/README.md).
_SERVICE_LINK = ("FLEX_PROXY_SERVICE_", "FLEX_PROXY_PORT_")


def version() -> str:
    try:
        return metadata.version("flex-proxy")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def _types(annotation: Any) -> list[Any]:
    """`Path | None` → [Path]; `tuple[SecretStr, ...]` → [tuple, SecretStr]: the types a field is made of."""
    origin = get_origin(annotation)
    if origin is Literal:
        return [Literal]
    if origin in (Union, types.UnionType):
        return [t for arg in get_args(annotation) if arg is not type(None) for t in _types(arg)]
    if origin is not None:
        return [origin, *(t for arg in get_args(annotation) if arg is not Ellipsis for t in _types(arg))]
    return [annotation]


def is_secret(info: FieldInfo) -> bool:
    """Keys are read from the environment only: a command line shows in `ps` and in shell history."""
    return SecretStr in _types(info.annotation)


def _metavar(name: str, info: FieldInfo) -> str:
    kinds = _types(info.annotation)
    if Literal in kinds:
        return "{" + ",".join(map(str, get_args(info.annotation))) + "}"
    if bool in kinds:
        return "{true,false}"
    if tuple in kinds:
        return "A,B,..."
    if Path in kinds:
        return "FILE"
    if int in kinds:
        return "N"
    if float in kinds:
        return "SECONDS" if name.endswith("_s") else "NUMBER"
    if name.endswith("_url"):
        return "URL"
    return "ADDRESS" if name == "host" else "TEXT"


def show_default(value: object) -> str:
    """A default as the operator would type it; each family's dated-snapshot pattern is named once."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        items = [str(v) for v in value]
        families = [v for v in items if v + _DATED in items]
        if families and len(families) * 2 == len(items):
            return ", ".join(families) + f" (each also as <name>{_DATED}, its dated snapshots)"
        return ", ".join(items) or "none"
    return str(value)


def _bound(info: FieldInfo) -> str:
    """`; at most N` for a setting with an upper bound, so the limit is known before it stops start-up."""
    for constraint in info.metadata:
        top = getattr(constraint, "le", None)
        if isinstance(top, int | float):
            return f"; at most {top:g}"
    return ""


def _help(name: str, info: FieldInfo) -> str:
    where = f"{env_name(name)}; default: {show_default(info.default)}{_bound(info)}"
    # argparse treats % as a format character in help text.
    text = f"{info.description.rstrip('.')}. [{where}]" if info.description else f"[{where}]"
    return text.replace("%", "%%")


def _key_help(info: FieldInfo) -> str:
    return f"{(info.description or '').rstrip('.')}; default: {show_default(info.default)}"


class _Formatter(argparse.HelpFormatter):
    """Wraps at spaces only, so model names and choices such as backoff-then-standard stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Each line of a description is its own paragraph."""
        return "\n".join(
            textwrap.fill(" ".join(line.split()), width, initial_indent=indent, subsequent_indent=indent * 2,
                          break_on_hyphens=False, break_long_words=False)
            for line in text.splitlines()
        )  # fmt: skip


class _SecretFlag(argparse.Action):
    """`--api-key` is refused with one line that never repeats the value it was given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:  # fmt: skip
        raise SystemExit(
            f"flex-proxy: {option_string} is not a flag: set {env_name(self.dest)} in the environment instead. "
            "Keys are read only from the environment, because a command line shows in `ps` to every user of "
            "the machine and stays in shell history."
        )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line; a mistyped flag gets the nearest real one."""
        hint = ""
        if message.startswith("unrecognized arguments: "):
            given = message.removeprefix("unrecognized arguments: ").split()[0].split("=")[0]
            flags = [o for action in self._actions for o in action.option_strings]
            close = difflib.get_close_matches(given, flags, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
        self.exit(2, f"{self.prog}: {message}{hint}; see {self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
    secrets = [name for name, info in Settings.model_fields.items() if is_secret(info)]
    parser = _Parser(
        prog="flex-proxy",
        usage="\n".join(["flex-proxy [OPTIONS]", *(f"       flex-proxy {usage}" for usage, _ in COMMANDS)]),
        description=DESCRIPTION,
        formatter_class=_Formatter,
        epilog="Every flag can also be set as FLEX_PROXY_<NAME> in the environment; a flag wins over its variable.",
    )
    parser.add_argument_group(
        "commands (without one, flex-proxy runs the proxy)",
        "\n".join(f"flex-proxy {usage}: {what}" for usage, what in COMMANDS),
    )
    parser.add_argument_group(
        "keys, read from the environment only, so they stay out of `ps` and shell history",
        "\n".join(f"{env_name(name)}: {_key_help(Settings.model_fields[name])}" for name in secrets),
    )
    parser.add_argument("--version", action="version", version=f"flex-proxy {version()}")
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name in secrets:
            parser.add_argument(flag, dest=name, nargs="?", action=_SecretFlag, help=argparse.SUPPRESS)
            continue
        parser.add_argument(flag, dest=name, default=None, metavar=_metavar(name, info), help=_help(name, info))
    return parser


def load_settings(argv: list[str]) -> Settings:
    """Flags over environment over defaults; a bad value exits with one line naming the setting."""
    args = _parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = error["loc"][0] if error["loc"] else ""
        # Field errors get their setting's name here; the others (rules between settings) begin with it.
        name = f"{env_name(str(loc))}: " if loc else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        raise SystemExit(f"flex-proxy: invalid setting {name}{message}") from None


def unknown_variables(environ: Iterable[str]) -> list[str]:
    """One warning per FLEX_PROXY_* variable that names no setting (a typo, most likely); the proxy ignores it."""
    known = {env_name(name) for name in Settings.model_fields}
    warnings = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(PREFIX) or upper in known:
            continue
        if upper.startswith(_SERVICE_LINK):
            why = "Kubernetes service links set it for a Service named flex-proxy: set enableServiceLinks: false"
        else:
            # Compared without the prefix, which every candidate shares and which would make anything look close.
            close = difflib.get_close_matches(upper.removeprefix(PREFIX), [k.removeprefix(PREFIX) for k in known], n=1)
            why = f"did you mean {PREFIX}{close[0]}?" if close else "see flex-proxy --help for the settings"
        warnings.append(f"{variable} is not a flex-proxy setting and is ignored ({why})")
    return warnings


def settings_warnings(settings: Settings) -> list[str]:
    """Settings that are valid but probably not what the operator meant."""
    warnings = []
    if not settings.flex_models:
        # A warning, not a refusal: an empty list is a real choice (flex only for requests that ask for it).
        warnings.append(
            f"{env_name('flex_models')} is empty: no request goes on flex unless it asks (X-Flex-Tier: flex, or its "
            f"own service_tier); unset {env_name('flex_models')} for the default list of flex models"
        )
    old = [entry.where for entry in settings.named_client_keys if entry.old_form]
    if old:
        # Only where the entries are, never what they hold: an entry is a key.
        more = f" and {len(old) - 5} more" if len(old) > 5 else ""
        warnings.append(
            f"{', '.join(old[:5])}{more}: `name=key` no longer names a key; each such entry is read as one bare key "
            "(client `default`). To name a key, write the name, a space, then the key: `name key`"
        )
    warnings += _upstream_warnings(settings.upstream_base_url)
    return warnings


def _upstream_warnings(base: str) -> list[str]:
    """A base URL without /v1: OpenAI answers every path without it 404. Other hosts are only warned about when
    the URL has no path at all (a gateway may serve the API under another path: that is left alone)."""
    url = urlsplit(base)
    host, path = (url.hostname or "").lower(), url.path.rstrip("/")
    setting = env_name("upstream_base_url")
    if host == "api.openai.com" or host.endswith(".api.openai.com"):
        if path != "/v1":
            return [
                f"{setting} is {base}, which does not end in /v1: OpenAI serves its API under /v1, so every request "
                f"would get upstream's 404; set {setting}={url.scheme}://{url.netloc}/v1"
            ]
    elif not path:
        return [
            f"{setting} is {base}, with no path: the proxy sends /v1/<rest> to {base}/<rest>, so an upstream that "
            f"serves the OpenAI API under /v1 (most do) needs {setting}={base}/v1; ignore this if yours serves it "
            "at its root"
        ]
    return []


def environment_warnings(environ: Mapping[str, str], settings: Settings) -> list[str]:
    """Variables an OpenAI user may expect the proxy to read, which it does not (never their values)."""
    if environ.get("OPENAI_API_KEY") and settings.api_key is None:
        return [
            "OPENAI_API_KEY is set, but the proxy does not read it: set FLEX_PROXY_API_KEY for the key the proxy "
            "sends on requests that carry none (clients that send their own key need neither)"
        ]
    return []


def grace_warnings(settings: Settings, longest_request_s: float) -> list[str]:
    """A drain shorter than the longest a request may wait for its answer cuts paid work at every restart."""
    if settings.shutdown_grace_s >= longest_request_s:
        return []
    grace = f"{settings.shutdown_grace_s:g} s"
    return [
        f"{env_name('shutdown_grace_s')} ({grace}) is shorter than the longest a request may wait for its answer "
        f"({longest_request_s:g} s, {env_name('request_budget_s')} or a policy's request_budget_s): on SIGTERM, "
        f"requests still in flight after {grace} are cut, and upstream may bill their work. Raise it, and keep the "
        "orchestrator's grace period (terminationGracePeriodSeconds, stop_grace_period) above it plus "
        f"{env_name('drain_delay_s')}"
    ]


def key_mode(settings: Settings) -> str:
    """client-keys: clients show one of ours and get the proxy's key; own-key: the proxy's key for requests
    without one; pass-through: each client's own key goes upstream."""
    if settings.client_keys:
        return "client-keys"
    return "own-key" if settings.api_key else "pass-through"


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def started_fields(settings: Settings, listening: Sequence[socket.socket], prices: int) -> dict[str, Any]:
    return {
        "version": version(),
        "listen": ",".join("http://" + host_port(*s.getsockname()[:2]) for s in listening),
        "upstream": settings.upstream_base_url,
        "mode": settings.mode,
        "strategy": settings.on_unavailable,
        "keys": key_mode(settings),
        "flex_patterns": len(settings.flex_models),
        "prices": prices,
        "shared_state": where(settings.state_url.get_secret_value()) if settings.state_url else "off",
    }


def _log(fmt: str, level: int, message: str, fields: Mapping[str, Any] | None = None) -> None:
    """A line of the proxy's own: in JSON mode the fields are members of its object, in text mode key=value."""
    logger = logging.getLogger(LOGGER)
    if fmt == "json":
        logger.log(level, message, extra={"fields": dict(fields or {})})
    else:
        logger.log(level, " ".join([message, *(f"{k}={text_value(v)}" for k, v in (fields or {}).items())]))


def listen(host: str, port: int) -> list[socket.socket]:
    """Bind every address `host` resolves to, as uvicorn would, so a busy port fails before start-up.

    SO_REUSEADDR is set (a restart need not wait for old connections in TIME_WAIT) and IPv6 sockets are
    IPv6-only, as asyncio makes them; the backlog is BACKLOG.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SystemExit(f"flex-proxy: cannot listen on {host}: {exc.strerror}") from None
    addresses = list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))
    sockets: list[socket.socket] = []
    skipped: OSError | None = None
    for family, sockaddr in addresses:
        try:
            sockets.append(socket.create_server(sockaddr, family=family, backlog=BACKLOG))
        except OSError as exc:
            # A family the machine lacks (localhost's ::1 in an IPv4-only container) is skipped if another binds.
            if exc.errno == errno.EADDRNOTAVAIL and len(addresses) > 1:
                skipped = skipped or exc
                continue
            for sock in sockets:
                sock.close()
            raise SystemExit(f"flex-proxy: cannot listen on {host_port(host, port)}: {_why(exc)}") from None
    if not sockets:
        assert skipped is not None
        raise SystemExit(f"flex-proxy: cannot listen on {host_port(host, port)}: {_why(skipped)}")
    return sockets


def _why(exc: OSError) -> str:
    reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
    if exc.errno == errno.EADDRINUSE:
        return reason + " (another process holds the port; stop it, or choose another with --port or FLEX_PROXY_PORT)"
    if exc.errno == errno.EACCES:
        return reason + " (ports below 1024 need privileges; choose another with --port or FLEX_PROXY_PORT)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return reason + " (no interface of this machine has that address; see --host or FLEX_PROXY_HOST)"
    return reason


def _count_prices(path: Path | None) -> int:
    """Models with a price; a price file that does not parse stops start-up with one line."""
    try:
        return len(PriceTable.load(path).models)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        where = f"FLEX_PROXY_PRICES_FILE {path}" if path else "the packaged price table"
        raise SystemExit(f"flex-proxy: cannot read prices from {where}: {type(exc).__name__}: {exc}") from None


class _Server(uvicorn.Server):
    """uvicorn's server, which says once that it is listening, after the app's start-up completed, and on SIGTERM
    keeps its listener open for `drain_delay_s` while /readyz answers 503, so load balancers stop sending first."""

    def __init__(
        self, config: uvicorn.Config, announce: Callable[[], None], drain_delay_s: float = 0.0,
        on_drain: Callable[[float], None] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(config)
        self.announce = announce
        self.drain_delay_s = drain_delay_s
        self.on_drain = on_drain
        self.stop_signal: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.announce()

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        if not self.should_exit:
            self.stop_signal = sig
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn runs the app's lifespan shutdown only after the drain: say "not ready" as the drain begins.
        services = getattr(self.config.app, "services", None)
        if services is not None:
            services.draining = True
        # uvicorn closes the listener at once; a load balancer that has not yet seen /readyz fail would have its
        # next connections refused. Only on SIGTERM (what orchestrators send): Ctrl-C at a terminal stops at once.
        delay = self.drain_delay_s if self.stop_signal == signal.SIGTERM else 0.0
        if delay > 0:
            if self.on_drain is not None:
                self.on_drain(delay)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + delay
            while not self.force_exit and (left := deadline - loop.time()) > 0:
                await asyncio.sleep(min(0.1, left))  # a second Ctrl-C (force_exit) ends the wait
        await super().shutdown(sockets)


def _raise_open_file_limit() -> None:
    """Each held request costs two sockets; many runtimes start processes with a soft limit of 1,024."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tune_gc() -> None:
    """Freeze start-up objects out of the collector's way and collect the young generation less often.

    Measured with the benchmark: with the defaults, full collections of 33-47 ms ran twice a second at 32
    connections and made the whole p99; freezing cut that p99 from ~46 ms to ~16 ms. Larger young-generation
    thresholds than this one saved little CPU and lengthened the tail at one connection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(2_000, 10, 10)


def _check_policy(argv: list[str]) -> int:
    """`flex-proxy check-policy FILE`: validate a policy file without starting anything."""
    parser = _Parser(
        prog="flex-proxy check-policy",
        description="Validate a policy file (FLEX_PROXY_POLICY_FILE) without starting anything: prints a summary "
        "of its policies and rules, or one line naming the line and the problem (exit status 1).",
        formatter_class=_Formatter,
    )
    parser.add_argument("file", metavar="FILE", help="the TOML policy file")
    path = Path(parser.parse_args(argv).file)
    if not path.is_file():
        print(f"flex-proxy: no such file: {path}", file=sys.stderr)
        return 1
    try:
        print(check_file(path))
    except PolicyFileError as exc:
        print(f"flex-proxy: invalid policy file {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        from .sim.cli import main as simulate

        return simulate(argv[1:])
    if argv[:1] == ["check-policy"]:
        return _check_policy(argv[1:])
    if argv[:1] == ["report"]:
        from .report import main as report

        key = os.environ.get("FLEX_PROXY_ADMIN_KEY", "").strip() or None  # a key only in the environment, never a flag
        return report(argv[1:], key, sys.stdout, sys.stderr)
    unknown = unknown_variables(os.environ)
    try:
        settings = load_settings(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a bad setting: a mistyped variable may be why
            for warning in unknown:
                print(f"flex-proxy: warning: {warning}", file=sys.stderr)
        raise
    configure(settings.log_level, settings.log_format)
    for warning in unknown + settings_warnings(settings) + environment_warnings(os.environ, settings):
        _log(settings.log_format, logging.WARNING, warning)
    _raise_open_file_limit()
    sockets = listen(settings.host, settings.port)
    prices = _count_prices(settings.prices_file)
    from .app import create_app

    try:
        app = create_app(settings)
    except PolicyFileError as exc:
        raise SystemExit(f"flex-proxy: invalid policy file {exc}") from None
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # logs.configure already set uvicorn's loggers up in the proxy's format
        access_log=False,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http=HttpProtocol,  # uvicorn's httptools protocol; under load a connection's writes leave once a turn (wire.py)
        ws="none",
        lifespan="on",
        backlog=BACKLOG,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        proxy_headers=False,  # the peer address decides who may use the control plane: no header may stand in for it
        server_header=False,
        date_header=False,
    )

    def announce() -> None:
        _log(settings.log_format, logging.INFO, "flex-proxy started", started_fields(settings, sockets, prices))

    def on_drain(delay: float) -> None:
        fields = {"readyz": 503, "listener_closes_in_s": delay, "then_in_flight_may_take_s": settings.shutdown_grace_s}
        _log(settings.log_format, logging.INFO, "flex-proxy draining", fields)

    longest = max(policy.request_budget_s for policy in app.services.policies.policies.values())
    for warning in grace_warnings(settings, longest):
        _log(settings.log_format, logging.WARNING, warning)
    _tune_gc()
    try:
        _Server(config, announce, settings.drain_delay_s, on_drain).run(sockets=sockets)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has drained on: done, not a crash to trace
        return 130
    return 0
