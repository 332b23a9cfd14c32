"""Logging set-up and the one access line written per request (text or JSON; never a key).

In JSON mode every line the process writes is one JSON object with a timestamp and a level: the proxy's own
lines, uvicorn's, and tracebacks. In text mode, values a client chose (paths, model names) are quoted with
their control characters escaped, so no one can forge a log line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

LOGGER = "flex_proxy"
_LOGGERS = (LOGGER, "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio")


def utc_iso(seconds: float) -> str:
    """A wall-clock time as UTC ISO 8601 with milliseconds: 2026-01-31T23:59:59.123Z."""
    whole = int(seconds)
    millis = min(999, int((seconds - whole) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the access fields, any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line.update(fields)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            record.msg = " ".join(f"{key}={text_value(value)}" for key, value in fields.items())
            record.args = None
        return super().format(record)


class _AbortedResponses(logging.Filter):
    """uvicorn logs a deliberately aborted response (asgi.ResponseAborted) as a crash: make it one warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "ResponseAborted":
            record.msg, record.args, record.exc_info, record.exc_text = f"response aborted: {exc}", None, None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure(level: str, fmt: str) -> logging.Handler:
    """Send every log line to stderr in one format; uvicorn's own access log stays off (ours replaces it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_AbortedResponses())
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler] if name in (LOGGER, "uvicorn", "asyncio") else []
        logger.propagate = name not in (LOGGER, "uvicorn", "asyncio")
        if name == LOGGER:
            logger.setLevel(level.upper())
    logging.getLogger("uvicorn").setLevel(level.upper())
    return handler


def text_value(value: object) -> str:
    """A value as it appears in a text line: numbers as plain decimals, odd text quoted and escaped."""
    if isinstance(value, float):
        return f"{value:.10f}".rstrip("0").rstrip(".") if value else "0"
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)  # quotes it and escapes control characters: one record stays one line


class AccessLog:
    """Writes one line per finished request."""

    def __init__(self, fmt: str = "text", logger: logging.Logger | None = None) -> None:
        self.json = fmt == "json"
        self.logger = logger or logging.getLogger(LOGGER + ".access")

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def write(self, fields: Mapping[str, object]) -> None:
        kept = {k: v for k, v in fields.items() if v is not None}
        self.logger.info("request", extra={"fields": kept})
