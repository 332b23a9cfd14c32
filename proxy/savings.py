"""What flex saved: the ledger's recent UTC days as totals and breakdowns by client and by model, typed for the
OpenAPI schema. `/flex/savings` answers it, and the savings page and `flex-proxy report` read that."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import BaseModel, Field

from .ledger import MAX_DAYS, Cell, DailyLedger, Tally, utc_day

DEFAULT_DAYS = 7


class Figures(BaseModel):
    """Requests and money over some cells of the ledger."""

    requests: int = Field(description="model requests finished, any outcome")
    answered: int = Field(description="of which answered (outcome ok)")
    flex_sent: int = Field(description="answered requests that were sent on flex")
    served_flex: int = Field(description="answered on the flex tier")
    flex_share: float | None = Field(description="served_flex / flex_sent; null when nothing answered went on flex")
    fallbacks: int = Field(description="re-sent on the standard tier after flex stayed unavailable")
    unread: int = Field(description="accepted upstream, answer never read to its end: upstream may bill them")
    cost_usd: float = Field(description="spend at the tier that served each answer")
    saved_usd: float = Field(description="standard price minus flex price of the answers served on flex")
    savings_lost_usd: float = Field(description="what flex would have saved on answers sent flex but served standard")
    cost_nusd: int = Field(description="cost_usd in whole nano-USD, exact")
    saved_nusd: int = Field(description="saved_usd in whole nano-USD, exact")
    lost_nusd: int = Field(description="savings_lost_usd in whole nano-USD, exact")


class ClientFigures(Figures):
    client: str = Field(description="the client's name (never its key)")


class ModelFigures(Figures):
    model: str = Field(description="model family: a priced family, `other`, or `none` (no model in the request)")


class DayFigures(Figures):
    day: str = Field(description="UTC day, YYYY-MM-DD")


class Period(BaseModel):
    first_day: str = Field(description="UTC day, YYYY-MM-DD")
    last_day: str = Field(description="UTC day, YYYY-MM-DD (today)")
    totals: Figures
    by_client: list[ClientFigures] = Field(description="most saved first")
    by_model: list[ModelFigures] = Field(description="most saved first")


class SavingsFigures(BaseModel):
    scope: Literal["process", "fleet"] = Field(
        description="process: this process since `started` (a restart, or another replica, counts apart); "
        "fleet: the ledger every replica shares"
    )
    scope_note: str = Field(description="the scope in words, for people")
    started: str = Field(description="when the ledger began counting (UTC, ISO 8601)")
    generated: str = Field(description="when this answer was made (UTC, ISO 8601)")
    mode: Literal["flex", "shadow"]
    shadow_saved_usd: float | None = Field(
        description="shadow mode: what flex would have saved, this process since it started; null in flex mode"
    )
    today: Period
    period: Period = Field(description="the `days` UTC days ending today")
    daily: list[DayFigures] = Field(description="one per UTC day of the period, newest first")


def total(tallies: Iterable[Tally]) -> Tally:
    out = Tally()
    for tally in tallies:
        out.merge(tally)
    return out


def _fields(t: Tally) -> dict[str, int | float | None]:
    return {
        "requests": t.requests,
        "answered": t.answered,
        "flex_sent": t.flex_sent,
        "served_flex": t.served_flex,
        "flex_share": t.served_flex / t.flex_sent if t.flex_sent else None,
        "fallbacks": t.fallbacks,
        "unread": t.unread,
        "cost_usd": usd(t.cost_nusd),
        "saved_usd": usd(t.saved_nusd),
        "savings_lost_usd": usd(t.lost_nusd),
        "cost_nusd": t.cost_nusd,
        "saved_nusd": t.saved_nusd,
        "lost_nusd": t.lost_nusd,
    }


def usd(nusd: int) -> float:
    """nano-USD as dollars: the nearest float, which prints as the exact decimal (0.002) below ~$9 million."""
    return nusd / 1e9


def _by(days: Iterable[Mapping[Cell, Tally]], side: int) -> dict[str, Tally]:
    """Cells summed by client (side 0) or by model (side 1)."""
    out: dict[str, Tally] = {}
    for cells in days:
        for key, tally in cells.items():
            out.setdefault(key[side], Tally()).merge(tally)
    return out


def _rank(rows: dict[str, Tally]) -> list[tuple[str, Tally]]:
    return sorted(rows.items(), key=lambda item: (-item[1].saved_nusd, -item[1].cost_nusd, item[0]))


def period(days: Mapping[str, Mapping[Cell, Tally]]) -> Period:
    """Totals and breakdowns over `days` (newest first)."""
    names = list(days)
    cells = list(days.values())
    return Period(
        first_day=names[-1],
        last_day=names[0],
        totals=Figures(**_fields(total(t for day in cells for t in day.values()))),
        by_client=[ClientFigures(client=name, **_fields(t)) for name, t in _rank(_by(cells, 0))],
        by_model=[ModelFigures(model=name, **_fields(t)) for name, t in _rank(_by(cells, 1))],
    )


def iso(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="seconds")


def scope_note(ledger: DailyLedger) -> str:
    if ledger.scope == "fleet":
        return "fleet-wide: every replica's requests, from the shared ledger"
    since = datetime.datetime.fromtimestamp(ledger.started, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"this process since {since} (a restart, or another replica, counts apart)"


async def savings_figures(
    ledger: DailyLedger, count: int, now: float, mode: Literal["flex", "shadow"], shadow_saved_nusd: int
) -> SavingsFigures:
    """The `count` UTC days ending today (held between 1 and MAX_DAYS), from the ledger."""
    days = await ledger.days(max(1, min(count, MAX_DAYS)), utc_day(now))
    today = next(iter(days))
    return SavingsFigures(
        scope=ledger.scope,
        scope_note=scope_note(ledger),
        started=iso(ledger.started),
        generated=iso(now),
        mode=mode,
        shadow_saved_usd=usd(shadow_saved_nusd) if mode == "shadow" else None,
        today=period({today: days[today]}),
        period=period(days),
        daily=[DayFigures(day=day, **_fields(total(cells.values()))) for day, cells in days.items()],
    )
