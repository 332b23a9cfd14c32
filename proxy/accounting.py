"""What happened to one request, and turning that into metrics, cost and its log line."""

from __future__ import annotations

from dataclasses import dataclass

from .logs import AccessLog
from .metrics import Metrics, tier_label
from .pricing import PriceTable, Usage, price


@dataclass
class Record:
    """What happened to one request, filled in as it goes."""

    endpoint: str
    method: str = "POST"
    path: str = ""
    model: str | None = None
    requested_tier: str | None = None
    served_tier: str | None = None
    tier_reason: str | None = None
    stream: bool = False
    attempts: int = 0
    fell_back: bool = False
    outcome: str = "ok"
    status: int = 0
    backoff_s: float = 0.0
    request_id: str | None = None
    usage: Usage | None = None
    cost_usd: float | None = None
    saved_usd: float | None = None

    def flex_headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers that tell the client what the proxy did."""
        return [
            (b"x-flex-attempts", str(self.attempts).encode()),
            (b"x-flex-requested-tier", (self.requested_tier or "none").encode()),
            (b"x-flex-served-tier", (self.served_tier or "none").encode()),
        ]


def account(rec: Record, duration: float, metrics: Metrics, prices: PriceTable, access_log: AccessLog) -> None:
    """Count the request, price its usage at the served tier, and write its log line."""
    model = metrics.model_label(rec.model)
    served = tier_label(rec.served_tier)
    metrics.requests.labels(rec.endpoint, model, tier_label(rec.requested_tier), served, rec.outcome).inc()
    metrics.duration.labels(rec.endpoint, rec.outcome).observe(duration)
    if rec.usage is not None and rec.model is not None:
        model_price = prices.resolve(rec.model)
        costing = None
        if model_price is not None:
            costing = price(model_price, rec.usage, rec.served_tier, sent_flex=rec.requested_tier == "flex")
        metrics.account(model, served, rec.usage, costing)
        if costing is not None:
            rec.cost_usd = float(costing.cost_usd)
            rec.saved_usd = float(costing.saved_usd)
    access_log.write(rec, duration)
