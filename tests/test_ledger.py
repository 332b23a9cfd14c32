"""The daily ledger: exact integer cells per UTC day, client and model, bounded in days and in cells a day."""

from __future__ import annotations

import datetime
from dataclasses import fields

import pytest

from proxy.ledger import MAX_CELLS, MAX_DAYS, OVERFLOW, Ledger, Tally, day_range, utc_day


def one(**values: int) -> Tally:
    return Tally(requests=1, **values)


@pytest.mark.parametrize(
    ("wall", "day"),
    [
        (0.0, "1970-01-01"), (86_399.999, "1970-01-01"), (86_400.0, "1970-01-02"),
        (1_796_515_199.0, "2026-12-05"), (1_796_515_200.0, "2026-12-06"), (1_709_164_800.0, "2024-02-29"),
    ],
)  # fmt: skip
def test_utc_day(wall: float, day: str) -> None:
    assert utc_day(wall) == day


def test_day_range_is_newest_first_and_bounded() -> None:
    assert day_range(3, "2024-03-01") == ["2024-03-01", "2024-02-29", "2024-02-28"]
    assert day_range(0, "2024-03-01") == ["2024-03-01"]
    assert len(day_range(MAX_DAYS, "2024-03-01")) == MAX_DAYS
    assert len(day_range(MAX_DAYS + 1, "2024-03-01")) == MAX_DAYS
    assert day_range(-5, "2024-03-01") == ["2024-03-01"]


async def test_cells_add_up_exactly_and_are_read_as_copies() -> None:
    ledger = Ledger(started=1_700_000_000.0)
    assert (ledger.scope, ledger.started) == ("process", 1_700_000_000.0)
    for _ in range(1000):
        ledger.add("2026-12-06", "web", "o3", one(answered=1, flex_sent=1, served_flex=1, cost_nusd=1, saved_nusd=1))
    ledger.add("2026-12-06", "web", "o3", one(fallbacks=1, unread=2, cost_nusd=2_000_000, lost_nusd=3))
    ledger.add("2026-12-05", "batch", "gpt-5-mini", one(cost_nusd=7))
    days = await ledger.days(3, "2026-12-06")
    assert list(days) == ["2026-12-06", "2026-12-05", "2026-12-04"]
    assert days["2026-12-06"] == {
        ("web", "o3"): Tally(1001, 1000, 1000, 1000, 1, 2, 2_001_000, 1000, 3),
    }
    assert days["2026-12-05"] == {("batch", "gpt-5-mini"): Tally(requests=1, cost_nusd=7)}
    assert days["2026-12-04"] == {}
    days["2026-12-06"][("web", "o3")].requests = 0  # a reader's change stays its own
    assert (await ledger.days(1, "2026-12-06"))["2026-12-06"][("web", "o3")].requests == 1001


def test_merge_adds_every_field() -> None:
    total = Tally()
    total.merge(Tally(*range(1, 10)))
    total.merge(Tally(*range(1, 10)))
    assert [getattr(total, f.name) for f in fields(Tally)] == [2 * n for n in range(1, 10)]


async def test_days_kept_are_bounded_oldest_dropped_first() -> None:
    ledger = Ledger(0.0)
    first = datetime.date(2026, 11, 1)
    names = [(first + datetime.timedelta(days=n)).isoformat() for n in range(MAX_DAYS + 5)]  # as the days come
    for name in names[:MAX_DAYS]:
        ledger.add(name, "web", "o3", one())
    kept = await ledger.days(MAX_DAYS, names[MAX_DAYS - 1])
    assert all(kept[name] for name in names[:MAX_DAYS])  # at the bound: every day kept
    ledger.add(names[MAX_DAYS], "web", "o3", one())  # past it: the oldest goes
    assert len(ledger._days) == MAX_DAYS
    assert names[0] not in ledger._days and names[1] in ledger._days
    for name in names[MAX_DAYS + 1 :]:
        ledger.add(name, "web", "o3", one())
    assert len(ledger._days) == MAX_DAYS and min(ledger._days) == names[5]


async def test_cells_a_day_are_bounded_and_fold_into_overflow() -> None:
    ledger = Ledger(0.0)
    day = "2026-12-06"
    for n in range(MAX_CELLS):
        ledger.add(day, f"client-{n}", "o3", one(cost_nusd=1))
    cells = (await ledger.days(1, day))[day]
    assert len(cells) == MAX_CELLS and OVERFLOW not in cells  # at the bound
    ledger.add(day, "client-0", "o3", one(cost_nusd=1))  # an existing cell still takes its own
    ledger.add(day, "new", "o3", one(cost_nusd=5))
    ledger.add(day, "newer", "gpt-5", one(cost_nusd=6))
    cells = (await ledger.days(1, day))[day]
    assert len(cells) == MAX_CELLS + 1
    assert cells[OVERFLOW] == Tally(requests=2, cost_nusd=11)
    assert cells[("client-0", "o3")] == Tally(requests=2, cost_nusd=2)
    assert sum(t.cost_nusd for t in cells.values()) == MAX_CELLS + 1 + 11  # nothing lost, only folded
