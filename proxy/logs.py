"""Logging set-up and the one access line written per request (text or JSON; never a key)."""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .accounting import Record

LOGGER = "flex_proxy"


def configure(level: str, fmt: str) -> None:
    """Send the proxy's logs to stderr; uvicorn's own access log stays off (this line replaces it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if fmt == "json" else "%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger(LOGGER)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class AccessLog:
    """Writes one line per finished request."""

    def __init__(self, fmt: str = "text", logger: logging.Logger | None = None) -> None:
        self.json = fmt == "json"
        self.logger = logger or logging.getLogger(LOGGER + ".access")

    def fields(self, rec: Record, duration: float) -> dict[str, Any]:
        usage = rec.usage
        return {
            "endpoint": rec.endpoint,
            "method": rec.method,
            "path": rec.path if rec.endpoint == "other" else None,
            "model": rec.model,
            "stream": rec.stream,
            "requested_tier": rec.requested_tier,
            "tier_reason": rec.tier_reason,
            "served_tier": rec.served_tier,
            "attempts": rec.attempts,
            "fallback": rec.fell_back,
            "outcome": rec.outcome,
            "status": rec.status,
            "input_tokens": usage.input if usage else None,
            "cached_tokens": usage.cached_input if usage else None,
            "output_tokens": usage.output if usage else None,
            "cost_usd": rec.cost_usd,
            "saved_usd": rec.saved_usd,
            "backoff_s": round(rec.backoff_s, 3),
            "duration_ms": round(duration * 1000, 1),
            "upstream_request_id": rec.request_id,
        }

    def write(self, rec: Record, duration: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        fields = {k: v for k, v in self.fields(rec, duration).items() if v is not None}
        if self.json:
            self.logger.info(json.dumps(fields, separators=(",", ":")))
        else:
            self.logger.info(" ".join(f"{k}={v}" for k, v in fields.items()))
