"""`flex-proxy report`: what flex saved, read from a running proxy's /flex/savings and shown as tables (or its
JSON, for scripts). The admin key comes from the environment; errors are one line."""

from __future__ import annotations

import argparse
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

from .ledger import MAX_DAYS
from .savings import DEFAULT_DAYS

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 15.0
MAX_ANSWER_BYTES = 16 * 1024 * 1024
COLUMNS = (
    ("requests", "requests", "int"), ("answered", "answered", "int"), ("flex share", "flex_share", "share"),
    ("spent", "cost_usd", "usd"), ("saved", "saved_usd", "usd"), ("savings lost", "savings_lost_usd", "usd"),
    ("fallbacks", "fallbacks", "int"), ("unread", "unread", "int"),
)  # fmt: skip


class ReportError(Exception):
    """One line for the operator: what went wrong and what to do."""


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_DAYS}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flex-proxy report",
        description="What flex saved, from a running proxy's /flex/savings: today and the last days, by client and "
        "by model, and each flex gate's state. The admin key, when the proxy asks for one, is read from "
        "FLEX_PROXY_ADMIN_KEY in the environment (a caller on the proxy's own machine or pod needs none).",
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"the proxy's address, without /v1 (default: {DEFAULT_URL})")
    p.add_argument("--days", type=_days, default=DEFAULT_DAYS, metavar="N",
                   help=f"UTC days ending today, 1 to {MAX_DAYS} (default: {DEFAULT_DAYS})")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print /flex/savings' JSON as it came, for scripts")
    return p


def base_url(url: str) -> str:
    """The proxy's root: a trailing / or /v1 (an OpenAI base URL) is taken off."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ReportError(f"--url must be an http:// or https:// address, not {url!r}")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def fetch(url: str, days: int, key: str | None, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """GET /flex/savings; every failure becomes a ReportError that says what to do."""
    target = f"{url}/flex/savings?days={days}"
    headers = {"accept": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(target, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            body = answer.read(MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as exc:
        raise ReportError(_refusal(url, exc.code, exc.read(65536), key)) from None
    except urllib.error.URLError as exc:
        raise ReportError(f"cannot reach {url}: {_reason(exc.reason)}") from None
    except (TimeoutError, OSError) as exc:
        raise ReportError(f"cannot reach {url}: {_reason(exc)}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ReportError(f"{target} did not answer JSON: is {url} a flex-proxy?") from None
    if not isinstance(data, dict) or not isinstance(data.get("today"), dict):
        raise ReportError(f"{target} answered something other than flex-proxy's savings")
    return data


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "no answer in time"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


def _refusal(url: str, status: int, body: bytes, key: str | None) -> str:
    if status == 401:
        if not key:
            return (
                f"{url} asks for the admin key: set FLEX_PROXY_ADMIN_KEY in the environment, or run this on the "
                "proxy's own machine or pod (kubectl port-forward, docker exec), where none is needed"
            )
        return f"{url} refused the admin key in FLEX_PROXY_ADMIN_KEY (401): it is not the proxy's"
    if status == 403:
        return (
            f"{url} has no admin key set, so it answers only callers on its own machine or pod: run this there "
            "(kubectl port-forward, docker exec), or set FLEX_PROXY_ADMIN_KEY on the proxy"
        )
    if status == 404:
        return f"{url} has no /flex/savings: give the proxy's own address (the page at / shows the same figures)"
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = ""
    return f"{url} answered {status}" + (f": {message}" if isinstance(message, str) and message else "")


def usd(value: float) -> str:
    """Dollars to the cent from $1 up; below, three significant digits (flex saves fractions of a cent a call)."""
    if not math.isfinite(value):
        return "-"
    if value < 0:
        return "-" + usd(-value)
    size = value
    if size == 0:
        return "$0"
    if size >= 1:
        return f"${value:,.2f}"
    decimals = min(9, max(2, 2 - math.floor(math.log10(size))))
    return "$" + f"{value:.{decimals}f}".rstrip("0").rstrip(".")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "usd":
        return usd(float(value))
    if kind == "share":
        return f"{float(value) * 100:.1f}%"
    return f"{int(value):,}"


def table(title: str, rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Aligned columns: the name on the left, figures on the right."""
    lines = [[title, *(label for label, _, _ in COLUMNS)]]
    lines += [[name, *(_cell(row.get(key), kind) for _, key, kind in COLUMNS)] for name, row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(
        cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)
    ).rstrip() for line in lines]  # fmt: skip


def render(data: dict[str, Any], url: str) -> str:
    today, period = data["today"], data["period"]
    t = today["totals"]
    share = "-" if t["flex_share"] is None else f"{t['flex_share'] * 100:.1f}% ({t['served_flex']} of {t['flex_sent']})"
    out = [
        f"flex-proxy at {url}: {data['scope_note']}; days are UTC",
        "",
        f"today {today['last_day']}: saved {usd(t['saved_usd'])}, spent {usd(t['cost_usd'])}, savings lost "
        f"{usd(t['savings_lost_usd'])}, flex share {share}, {_count(t['fallbacks'], 'fallback')}, {t['unread']} unread",
    ]
    if data.get("mode") == "shadow":
        out.append(f"shadow mode: flex would have saved {usd(data.get('shadow_saved_usd') or 0.0)} "
                   "(this process since it started)")  # fmt: skip
    span = f"{period['first_day']} to {period['last_day']}"
    days = [(d["day"], d) for d in data["daily"]] + [("total", period["totals"])]
    out += ["", *table("day", days)]
    clients = [(c["client"], c) for c in period["by_client"]]
    out += ["", f"by client, {span}", *(table("client", clients) if clients else ["  none"])]
    models = [(m["model"], m) for m in period["by_model"]]
    out += ["", f"by model, {span}", *(table("model", models) if models else ["  none"])]
    out += ["", "flex gates: " + _gates(data.get("gates") or {})]
    return "\n".join(out)


def _gates(status: dict[str, Any]) -> str:
    if not status.get("gate_enabled", True):
        return "off (FLEX_PROXY_FLEX_GATE=false)"
    shown = []
    for family in status.get("families", []):
        for gate in family.get("gates", []):
            waiting = f", {gate['waiting']} waiting" if gate.get("waiting") else ""
            shown.append(f"{gate['key']} {gate['state']}{waiting}")
    return ", ".join(shown) or "none yet (no flex request seen)"


def main(argv: list[str], key: str | None, out: TextIO, err: TextIO) -> int:
    args = parser().parse_args(argv)
    try:
        url = base_url(args.url)
        data = fetch(url, args.days, key)
    except ReportError as exc:
        print(f"flex-proxy report: {exc}", file=err)
        return 1
    if args.json:
        print(json.dumps(data, indent=2), file=out)
    else:
        print(render(data, url), file=out)
    return 0
