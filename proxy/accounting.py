"""What happened to one request, and turning that into metrics, cost and its log line."""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .config import NO_CLIENT
from .ledger import DailyLedger, Tally
from .logs import AccessLog, utc_iso
from .metrics import Metrics, tier_label
from .pricing import Costing, PriceTable, Usage, nano_usd, price, shadow_savings
from .spend import DailySpend, SpendTab


@dataclass(slots=True)
class Record:
    """What happened to one request, filled in as it goes."""

    endpoint: str
    method: str = "POST"
    path: str = ""
    peer: str | None = None  # the client's address (the TCP peer)
    client: str = NO_CLIENT  # the client's name once its key is accepted; `none` before (or never)
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
    request_id: str | None = None  # upstream's x-request-id
    error_id: str | None = None  # the x-request-id of an error the proxy made itself
    usage: Usage | None = None
    cost_usd: float | None = None
    saved_usd: float | None = None  # what flex saved (negative: lost to a fallback); None in shadow mode
    shadow_saving: Decimal | None = None  # shadow mode: what flex would have saved on this answer
    spend: SpendTab | None = None  # the client's cap: holds taken before standard sends, settled once here

    @property
    def shadow(self) -> bool:
        """Shadow mode: the request went as sent, so its saving is one flex would have made, not one it made."""
        return self.tier_reason == "shadow"

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

    def fields(self, duration: float, end: float) -> dict[str, Any]:
        """The access log line's fields; `end` is the wall-clock time the request finished."""
        usage = self.usage
        return {
            "start": utc_iso(end - duration),
            "end": utc_iso(end),
            "client_addr": self.peer,
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
            "reasoning_tokens": usage.reasoning if usage else None,
            "cost_usd": self.cost_usd,
            "saved_usd": self.saved_usd,
            "shadow_saved_usd": float(self.shadow_saving) if self.shadow_saving is not None else None,
            "backoff_s": round(self.backoff_s, 3),
            "gate_wait_s": round(self.gate_wait_s, 3),
            "duration_ms": round(duration * 1000, 1),
            "request_id": self.error_id,
            "upstream_request_id": self.request_id,
        }


def tier_labels(rec: Record) -> tuple[str, str]:
    """The requested and served tier as metric labels: `none` where there is no tier (pass-through, a request
    refused before its tier was decided, no answer), as in the X-Flex-Requested-Tier and -Served-Tier headers."""
    if rec.endpoint == "other" or rec.tier_reason is None:
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
    if not rec.shadow:
        rec.saved_usd = float(costing.saved_usd - costing.lost_usd)
    elif rec.shadow_eligible and model_price.flex is not None:
        rec.shadow_saving = shadow_savings(model_price, rec.usage, rec.served_tier)
    rec.costing = costing
    return costing


def cost_headers(rec: Record, prices: PriceTable) -> list[tuple[bytes, bytes]]:
    """What this answer cost and what flex saved on it, when its model has a price (the saving is negative after
    a fallback). In shadow mode no flex saving was made: what flex would have saved is sent apart, when known."""
    if price_record(rec, prices) is None or rec.cost_usd is None:
        return []
    headers = [(b"x-flex-cost-usd", _usd(rec.cost_usd))]
    if rec.saved_usd is not None:
        headers.append((b"x-flex-saved-usd", _usd(rec.saved_usd)))
    if rec.shadow_saving is not None:
        headers.append((b"x-flex-shadow-saved-usd", _usd(float(rec.shadow_saving))))
    return headers


def _usd(value: float) -> bytes:
    return f"{value:.8f}".encode()


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
    end: float | None = None,
) -> None:
    """Count the request, price its usage at the served tier, add standard spend to the client's day, add a model
    request to the ledger's `day` (the same numbers the counters get), and write its log line; `end` is the
    wall-clock time the request finished."""
    model = metrics.model_label(rec.model, rec.endpoint)
    requested, served = tier_labels(rec)
    metrics.outcomes.labels(rec.endpoint, rec.outcome).inc()
    if rec.outcome == "ok":
        metrics.answered.labels(rec.endpoint, requested, served).inc()
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
        if rec.shadow_saving is not None:
            metrics.shadow_saved.add(nano_usd(rec.shadow_saving), model, rec.client)
    elif rec.outcome == "ok" and rec.endpoint != "other":
        # Answered without usage (a chat stream that did not ask for it, where the proxy may not add the ask: shadow
        # mode, X-Flex-Tier: off): its cost, and in shadow mode what flex would have saved, are unknown.
        metrics.unpriced.labels(model, served).inc()
    if rec.spend is not None:
        rec.spend.settle(standard_usd)  # gives its holds back even when nothing was priced
    elif spend is not None and standard_usd:
        spend.add(rec.client, standard_usd, model)
    if rec.unread:
        metrics.unread.labels(rec.endpoint, model, requested).inc(rec.unread)
    if ledger is not None and rec.endpoint != "other":
        ledger.add(day, rec.client, model, tally_of(rec, served, money))
    if access_log.enabled:
        access_log.write(rec.fields(duration, time.time() if end is None else end))
