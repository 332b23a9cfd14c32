"""What happened to one request, and turning that into metrics, cost and its log line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .ledger import DailyLedger, Tally
from .logs import AccessLog
from .metrics import Metrics, tier_label
from .pricing import Costing, PriceTable, Usage, nano_usd, price, shadow_savings
from .spend import DailySpend, SpendTab


@dataclass
class Record:
    """What happened to one request, filled in as it goes."""

    endpoint: str
    method: str = "POST"
    path: str = ""
    client: str = "default"
    policy: str | None = None
    shadow_eligible: bool = False  # shadow mode: the proxy would have put this request on flex
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
    gate_wait_s: float = 0.0
    # Attempts upstream may have accepted, and so billed, whose answer was never read to its end (a timeout, a
    # drop after a silence, a cut, a client that left): the cost metrics cannot price them, so they are counted
    # apart (OpenAI bills accepted work even when nobody reads the answer; see README, "Never pay twice").
    unread: int = 0
    costing: Costing | None = None  # set once priced, so the cost headers and the metrics price it once
    request_id: str | None = None
    usage: Usage | None = None
    cost_usd: float | None = None
    saved_usd: float | None = None
    spend: SpendTab | None = None  # the client's cap: holds taken before standard sends, settled once here

    def flex_headers(self, served: bool = True) -> list[tuple[bytes, bytes]]:
        """The response headers that tell the client what the proxy did; `served` False leaves out the served
        tier, for an answer whose tier is not known yet when its headers go."""
        headers = [
            (b"x-flex-attempts", str(self.attempts).encode()),
            (b"x-flex-requested-tier", (self.requested_tier or "none").encode()),
        ]
        if served:
            headers.append((b"x-flex-served-tier", (self.served_tier or "none").encode()))
        return headers

    def fields(self, duration: float) -> dict[str, Any]:
        """The access log line's fields."""
        usage = self.usage
        return {
            "endpoint": self.endpoint,
            "method": self.method,
            "path": self.path if self.endpoint == "other" else None,
            "client": self.client,
            "policy": self.policy,
            "model": self.model,
            "stream": self.stream,
            "requested_tier": self.requested_tier,
            "tier_reason": self.tier_reason,
            "served_tier": self.served_tier,
            "attempts": self.attempts,
            "fallback": self.fell_back,
            "outcome": self.outcome,
            "status": self.status,
            "input_tokens": usage.input if usage else None,
            "cached_tokens": usage.cached_input if usage else None,
            "output_tokens": usage.output if usage else None,
            "cost_usd": self.cost_usd,
            "saved_usd": self.saved_usd,
            "backoff_s": round(self.backoff_s, 3),
            "gate_wait_s": round(self.gate_wait_s, 3),
            "duration_ms": round(duration * 1000, 1),
            "upstream_request_id": self.request_id,
        }


def tier_labels(rec: Record) -> tuple[str, str]:
    """The requested and served tier as metric labels: `none` where there is no tier (pass-through, no answer)."""
    if rec.endpoint == "other":
        return "none", "none"
    answered = rec.outcome == "ok" or rec.usage is not None
    return tier_label(rec.requested_tier), tier_label(rec.served_tier, missing="standard" if answered else "none")


def price_record(rec: Record, prices: PriceTable) -> Costing | None:
    """Price the record's usage at its served tier, when its model has a price; the saving is negative for an
    answer sent on flex but served on another tier (what flex would have saved)."""
    if rec.costing is not None:
        return rec.costing
    if rec.usage is None or rec.model is None:
        return None
    model_price = prices.resolve(rec.model)
    if model_price is None:
        return None
    costing = price(model_price, rec.usage, rec.served_tier, sent_flex=rec.requested_tier == "flex")
    if costing is None:  # no price for the tier that served it
        return None
    rec.cost_usd = float(costing.cost_usd)
    rec.saved_usd = float(costing.saved_usd - costing.lost_usd)
    rec.costing = costing
    return costing


def tally_of(rec: Record, served: str, money: tuple[int, int, int] | None) -> Tally:
    """One finished model request as a ledger cell."""
    answered = rec.outcome == "ok"
    cost, saved, lost = money or (0, 0, 0)
    return Tally(
        requests=1,
        answered=int(answered),
        flex_sent=int(answered and rec.requested_tier == "flex"),
        served_flex=int(answered and served == "flex"),
        fallbacks=int(rec.fell_back),
        unread=rec.unread,
        cost_nusd=cost,
        saved_nusd=saved,
        lost_nusd=lost,
    )


def account(
    rec: Record,
    duration: float,
    metrics: Metrics,
    prices: PriceTable,
    access_log: AccessLog,
    spend: DailySpend | None = None,
    ledger: DailyLedger | None = None,
    day: str = "",
) -> None:
    """Count the request, price its usage at the served tier, add standard spend to the client's day, add a model
    request to the ledger's `day` (the same numbers the counters get), and write its log line."""
    model = metrics.model_label(rec.model)
    requested, served = tier_labels(rec)
    metrics.requests.labels(rec.endpoint, model, rec.client, requested, served, rec.outcome).inc()
    metrics.duration.labels(rec.endpoint, rec.outcome).observe(duration)
    money = None
    standard_usd = 0.0
    if rec.usage is not None and rec.model is not None:
        costing = price_record(rec, prices)
        if costing is not None:
            money = nano_usd(costing.cost_usd), nano_usd(costing.saved_usd), nano_usd(costing.lost_usd)
        metrics.account(model, rec.client, served, rec.usage, money)
        if costing is not None and served != "flex":
            standard_usd = float(costing.cost_usd)
        if rec.shadow_eligible:
            model_price = prices.resolve(rec.model)
            if model_price is not None:
                saving = shadow_savings(model_price, rec.usage, rec.served_tier)
                metrics.shadow_saved.add(nano_usd(saving), model, rec.client)
    if rec.spend is not None:
        rec.spend.settle(standard_usd)  # gives its holds back even when nothing was priced
    elif spend is not None and standard_usd:
        spend.add(rec.client, standard_usd, model)
    if rec.unread:
        metrics.unread.labels(rec.endpoint, model, requested).inc(rec.unread)
    if ledger is not None and rec.endpoint != "other":
        ledger.add(day, rec.client, model, tally_of(rec, served, money))
    if access_log.enabled:
        access_log.write(rec.fields(duration))

