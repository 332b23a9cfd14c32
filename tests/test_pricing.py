"""proxy.pricing: usage x rates of the served tier, and what flex saved or would have saved."""

from __future__ import annotations

import json
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from proxy.config import FLEX_FAMILIES
from proxy.pricing import (
    Costing,
    ModelPrice,
    PriceTable,
    Rates,
    Usage,
    cost,
    family_of,
    price,
    shadow_savings,
    tier_rates,
    usage_from,
)

D = Decimal
TABLE = PriceTable.load()
PACKAGED = json.loads(resources.files("proxy").joinpath("prices.json").read_text(encoding="utf-8"))["models"]
O3_USAGE = Usage(input=1_000_000, cached_input=200_000, output=500_000)
SOL_USAGE = Usage(input=1_000_000, cached_input=200_000, output=100_000, cache_write=100_000)


@pytest.mark.parametrize(
    ("served", "sent_flex", "expected"),
    [
        # flex: 0.8M x $1.00 + 0.2M x $0.25 + 0.5M x $4.00 = $2.85; standard: 0.8M x 2 + 0.2M x 0.5 + 0.5M x 8 = $5.70
        ("flex", True, Costing(D("2.85"), D("2.85"), D(0))),
        ("flex", False, Costing(D("2.85"), D("2.85"), D(0))),
        ("default", True, Costing(D("5.70"), D(0), D("2.85"))),
        ("default", False, Costing(D("5.70"), D(0), D(0))),
        ("auto", True, Costing(D("5.70"), D(0), D("2.85"))),
        (None, True, Costing(D("5.70"), D(0), D("2.85"))),
        (None, False, Costing(D("5.70"), D(0), D(0))),
        # priority: 0.8M x $3.50 + 0.2M x $0.875 + 0.5M x $14 = $9.975; sent flex, it lost $9.975 - $2.85
        ("priority", True, Costing(D("9.975"), D(0), D("7.125"))),
        ("priority", False, Costing(D("9.975"), D(0), D(0))),
        ("scale", False, None),
        ("ultrafast", False, None),
        ("fast", False, None),  # a request value only: responses report "priority"
    ],
)
def test_o3_price(served: str | None, sent_flex: bool, expected: Costing | None) -> None:
    model_price = TABLE.resolve("o3")
    assert model_price is not None
    assert price(model_price, O3_USAGE, served, sent_flex=sent_flex) == expected


@pytest.mark.parametrize(
    ("model", "usage", "served", "expected"),
    [
        # 0.1M x $1.25 + 10k x $10 = $0.225 standard, half on flex
        ("gpt-5-2025-08-07", Usage(100_000, 0, 10_000), "flex", Costing(D("0.1125"), D("0.1125"), D(0))),
        ("o3-2025-04-16", Usage(1_000_000, 200_000, 500_000), "flex", Costing(D("2.85"), D("2.85"), D(0))),
        # 1M x $1.10 + 1M x $4.40 = $5.50 standard, $2.75 flex
        ("o4-mini", Usage(1_000_000, 0, 1_000_000), "default", Costing(D("5.50"), D(0), D(0))),
        ("gpt-5-mini", Usage(0, 0, 0), "flex", Costing(D(0), D(0), D(0))),
        # 0.7M x $5 + 0.2M x $0.50 + 0.1M written x $6.25 + 0.1M x $30 = $7.225; flex exactly half
        ("gpt-5.6-sol", SOL_USAGE, "default", Costing(D("7.225"), D(0), D(0))),
        ("gpt-5.6-sol", SOL_USAGE, "flex", Costing(D("3.6125"), D("3.6125"), D(0))),
        # priority: 0.7M x $10 + 0.2M x $1 + 0.1M written x $12.50 + 0.1M x $60 = $14.45
        ("gpt-5.6-sol", SOL_USAGE, "priority", Costing(D("14.45"), D(0), D(0))),
        # 1M x $12.50 + 1M x $75: OpenAI's published priority price, not 2x standard
        ("gpt-5.5", Usage(1_000_000, 0, 1_000_000), "priority", Costing(D("87.50"), D(0), D(0))),
        ("gpt-5.4-nano", Usage(1_000_000, 0, 1_000_000), "priority", None),  # no priority tier for it
        ("gpt-5-nano", Usage(1_000_000, 0, 1_000_000), "priority", None),
    ],
)  # fmt: skip
def test_price(model: str, usage: Usage, served: str, expected: Costing | None) -> None:
    model_price = TABLE.resolve(model)
    assert model_price is not None
    assert price(model_price, usage, served, sent_flex=False) == expected


# Models without a flex price: costed at the tier that served them, never a saving or a loss, even if sent flex.
# O3_USAGE on gpt-4o: 0.8M x $2.50 + 0.2M x $1.25 + 0.5M x $10 = $7.25; priority 0.8M x 4.25 + 0.2M x 2.125 + 0.5M x 17
@pytest.mark.parametrize(
    ("model", "usage", "served", "sent_flex", "expected"),
    [
        ("gpt-4o", O3_USAGE, "default", False, Costing(D("7.25"), D(0), D(0))),
        ("gpt-4o", O3_USAGE, "default", True, Costing(D("7.25"), D(0), D(0))),
        ("gpt-4o", O3_USAGE, None, True, Costing(D("7.25"), D(0), D(0))),
        ("gpt-4o-2024-08-06", O3_USAGE, "default", False, Costing(D("7.25"), D(0), D(0))),
        ("gpt-4o", O3_USAGE, "priority", True, Costing(D("12.325"), D(0), D(0))),
        ("gpt-4o", O3_USAGE, "flex", True, None),  # served on a tier it has no price for: unpriced, not guessed
        ("gpt-4o", O3_USAGE, "scale", False, None),
        # its own snapshot price, no cached rate: 1M x $5 + 0.5M x $15; priority 1M x $8.75 + 0.5M x $26.25
        ("gpt-4o-2024-05-13", O3_USAGE, "default", False, Costing(D("12.50"), D(0), D(0))),
        ("gpt-4o-2024-05-13", O3_USAGE, "priority", False, Costing(D("21.875"), D(0), D(0))),
        # 1M x $0.15 + 1M x $0.60; priority 1M x $0.25 + 1M x $1.00
        ("gpt-4o-mini", Usage(1_000_000, 0, 1_000_000), "default", False, Costing(D("0.75"), D(0), D(0))),
        ("gpt-4o-mini", Usage(1_000_000, 0, 1_000_000), "priority", False, Costing(D("1.25"), D(0), D(0))),
        # 0.8M x $2 + 0.2M x $0.50 + 0.5M x $8, as o3 on standard
        ("gpt-4.1-2025-04-14", O3_USAGE, "default", True, Costing(D("5.70"), D(0), D(0))),
        ("o3-mini-2025-01-31", Usage(1_000_000, 0, 1_000_000), "default", True, Costing(D("5.50"), D(0), D(0))),
        # pro models: standard only; 1M x $30 + 0.1M x $180
        ("gpt-5.4-pro", Usage(1_000_000, 0, 100_000), "default", True, Costing(D("48.00"), D(0), D(0))),
        ("gpt-5.4-pro", Usage(1_000_000, 0, 100_000), "priority", False, None),
        ("o1-pro-2025-03-19", Usage(10_000, 0, 10_000), "default", False, Costing(D("7.50"), D(0), D(0))),
    ],
)  # fmt: skip
def test_price_without_flex(
    model: str, usage: Usage, served: str | None, sent_flex: bool, expected: Costing | None
) -> None:
    model_price = TABLE.resolve(model)
    assert model_price is not None and model_price.flex is None
    assert price(model_price, usage, served, sent_flex=sent_flex) == expected


@pytest.mark.parametrize(
    ("model", "usage", "served", "saved"),
    [
        ("o3", O3_USAGE, "default", D("2.85")),  # $5.70 standard - $2.85 flex
        ("o3", O3_USAGE, "auto", D("2.85")),
        ("o3", O3_USAGE, None, D("2.85")),
        ("o3-2025-04-16", O3_USAGE, "default", D("2.85")),
        ("o3", O3_USAGE, "priority", D("7.125")),  # $9.975 priority - $2.85 flex
        ("o3", O3_USAGE, "flex", D(0)),  # already on flex: nothing left to save
        ("o3", O3_USAGE, "scale", D(0)),  # no price for what it cost: nothing claimed
        ("o3", Usage(), "default", D(0)),
        ("gpt-5-2025-08-07", Usage(100_000, 0, 10_000), "default", D("0.1125")),
        ("gpt-5.6-sol", SOL_USAGE, "default", D("3.6125")),  # $7.225 - $3.6125, cache writes included
        ("gpt-5.6-sol", SOL_USAGE, "priority", D("10.8375")),  # $14.45 - $3.6125
        ("gpt-4o", O3_USAGE, "default", D(0)),  # no flex price: no shadow savings
        ("gpt-4o", O3_USAGE, "priority", D(0)),
        ("gpt-5.5-pro", O3_USAGE, "default", D(0)),
    ],
)
def test_shadow_savings(model: str, usage: Usage, served: str | None, saved: Decimal) -> None:
    model_price = TABLE.resolve(model)
    assert model_price is not None
    assert shadow_savings(model_price, usage, served) == saved


@pytest.mark.parametrize("model", sorted(PACKAGED))
@pytest.mark.parametrize("served", ["default", "priority"])
def test_shadow_savings_is_what_a_fallback_loses(model: str, served: str) -> None:
    """Shadow mode claims exactly what the proxy counts as lost when it sent flex and this tier served."""
    model_price = TABLE.models[model]
    usage = Usage(input=123_457, cached_input=65_536, output=9_876, cache_write=1_024)
    costing = price(model_price, usage, served, sent_flex=True)
    assert shadow_savings(model_price, usage, served) == (costing.lost_usd if costing else D(0))


@pytest.mark.parametrize(
    ("served", "tier"),
    [(None, "standard"), ("default", "standard"), ("auto", "standard"), ("standard", "standard"),
     ("flex", "flex"), ("priority", "priority"), ("scale", None), ("ultrafast", None), ("fast", None), ("", None)],
)  # fmt: skip
def test_tier_rates(served: str | None, tier: str | None) -> None:
    o3 = TABLE.models["o3"]
    assert tier_rates(o3, served) == (getattr(o3, tier) if tier else None)


O3_STANDARD = Rates(D("2.00"), D("0.50"), D("8.00"))
SOL_STANDARD = Rates(D("5.00"), D("0.50"), D("30.00"), D("6.25"))


@pytest.mark.parametrize(
    ("rates", "usage", "usd"),
    [
        (O3_STANDARD, Usage(), D(0)),
        (O3_STANDARD, Usage(input=1_000_000), D("2.00")),
        (O3_STANDARD, Usage(input=1_000_000, cached_input=1_000_000), D("0.50")),
        (O3_STANDARD, Usage(output=1_000_000, reasoning=900_000), D("8.00")),  # reasoning is inside output
        (O3_STANDARD, Usage(input=100_000, cached_input=200_000), D("0.05")),  # cached never exceeds input
        (O3_STANDARD, Usage(input=1_000_000, cache_write=100_000), D("2.00")),  # no write rate: plain input
        (O3_STANDARD, Usage(input=1, output=1), D("0.00001")),
        (SOL_STANDARD, Usage(input=1_000_000, cache_write=1_000_000), D("6.25")),
        (SOL_STANDARD, Usage(input=100, cached_input=80, cache_write=50), D("0.000165")),  # 80 cached + 20 written
        (SOL_STANDARD, Usage(input=1_000_000, cached_input=1_000_000, cache_write=10), D("0.50")),
    ],
)
def test_cost(rates: Rates, usage: Usage, usd: Decimal) -> None:
    assert cost(rates, usage) == usd


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("o3", "o3"),
        ("o3-2025-04-16", "o3"),
        ("o4-mini", "o4-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-5", "gpt-5"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-5.6-sol", "gpt-5.6-sol"),
        ("gpt-5.6-sol-2026-07-09", "gpt-5.6-sol"),
        ("o3-mini", "o3-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o3-pro", "o3-pro"),
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # priced apart from its family
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("gpt-5.4-pro", "gpt-5.4-pro"),
        ("gpt-5.4-pro-2026-03-05", "gpt-5.4-pro"),
        ("gpt-5-chat-latest", "gpt-5-chat-latest"),
        # unknown models
        ("gpt-9", None),
        ("gpt-9-2027-01-01", None),
        ("text-embedding-3-small", None),
        ("o3-2025-04", None),
        ("gpt-4o-", None),
        ("", None),
    ],
)
def test_resolve(model: str, family: str | None) -> None:
    resolved = TABLE.resolve(model)
    assert (resolved.family if resolved else None) == family


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("o3-2025-04-16", "o3"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("o3", "o3"),
        ("gpt-5-chat-latest", "gpt-5-chat-latest"),
        ("o3-2025-4-16", "o3-2025-4-16"),
        ("2025-04-16", "2025-04-16"),
    ],
)
def test_family_of(model: str, family: str) -> None:
    assert family_of(model) == family


# Rates from OpenAI's pricing and priority pages and LiteLLM's price table (USD per 1M tokens).
@pytest.mark.parametrize(
    ("model", "standard", "flex", "priority"),
    [
        (
            "o3",
            Rates(D("2.00"), D("0.50"), D("8.00")),
            Rates(D("1.00"), D("0.25"), D("4.00")),
            Rates(D("3.50"), D("0.875"), D("14.00")),
        ),
        (
            "o4-mini",
            Rates(D("1.10"), D("0.275"), D("4.40")),
            Rates(D("0.55"), D("0.1375"), D("2.20")),
            Rates(D("2.00"), D("0.50"), D("8.00")),
        ),
        (
            "gpt-5",
            Rates(D("1.25"), D("0.125"), D("10.00")),
            Rates(D("0.625"), D("0.0625"), D("5.00")),
            Rates(D("2.50"), D("0.25"), D("20.00")),
        ),
        ("gpt-5-nano", Rates(D("0.05"), D("0.005"), D("0.40")), Rates(D("0.025"), D("0.0025"), D("0.20")), None),
        (
            "gpt-5.6-sol",
            Rates(D("5.00"), D("0.50"), D("30.00"), D("6.25")),
            Rates(D("2.50"), D("0.25"), D("15.00"), D("3.125")),
            Rates(D("10.00"), D("1.00"), D("60.00"), D("12.50")),
        ),
        (
            "gpt-4o",
            Rates(D("2.50"), D("1.25"), D("10.00")),
            None,
            Rates(D("4.25"), D("2.125"), D("17.00")),
        ),
        ("gpt-4o-2024-05-13", Rates(D("5.00"), D("5.00"), D("15.00")), None, Rates(D("8.75"), D("8.75"), D("26.25"))),
        ("gpt-4o-mini", Rates(D("0.15"), D("0.075"), D("0.60")), None, Rates(D("0.25"), D("0.125"), D("1.00"))),
        ("gpt-4.1", Rates(D("2.00"), D("0.50"), D("8.00")), None, Rates(D("3.50"), D("0.875"), D("14.00"))),
        ("gpt-4.1-mini", Rates(D("0.40"), D("0.10"), D("1.60")), None, Rates(D("0.70"), D("0.175"), D("2.80"))),
        ("gpt-4.1-nano", Rates(D("0.10"), D("0.025"), D("0.40")), None, Rates(D("0.20"), D("0.05"), D("0.80"))),
        ("o1", Rates(D("15.00"), D("7.50"), D("60.00")), None, None),
        ("o3-mini", Rates(D("1.10"), D("0.55"), D("4.40")), None, None),
        ("o3-pro", Rates(D("20.00"), D("20.00"), D("80.00")), None, None),
        ("gpt-5-pro", Rates(D("15.00"), D("15.00"), D("120.00")), None, None),
        ("gpt-5.4-pro", Rates(D("30.00"), D("3.00"), D("180.00")), None, None),
        ("gpt-5.5-pro", Rates(D("30.00"), D("3.00"), D("180.00")), None, None),
    ],
)
def test_packaged_rates(model: str, standard: Rates, flex: Rates | None, priority: Rates | None) -> None:
    model_price = TABLE.models[model]
    assert (model_price.standard, model_price.flex, model_price.priority) == (standard, flex, priority)


FIELDS = ("input", "cached_input", "output", "cache_write")


@pytest.mark.parametrize("model", sorted(m for m, entry in PACKAGED.items() if "flex" in entry))
def test_packaged_flex_is_half_of_standard(model: str) -> None:
    entry = PACKAGED[model]
    for field in FIELDS:
        assert (field in entry["standard"]) == (field in entry["flex"])
        if field in entry["standard"]:
            assert abs(entry["flex"][field] - entry["standard"][field] / 2) <= 1e-9, field


@pytest.mark.parametrize("model", sorted(m for m, entry in PACKAGED.items() if "priority" in entry))
def test_packaged_priority_costs_more_than_standard(model: str) -> None:
    entry = PACKAGED[model]
    for field in FIELDS:
        assert (field in entry["standard"]) == (field in entry["priority"]), field
        if field in entry["standard"]:
            assert entry["standard"][field] < entry["priority"][field] <= 2.5 * entry["standard"][field], field


@pytest.mark.parametrize("model", sorted(PACKAGED))
def test_packaged_entries_name_a_source_and_known_tiers(model: str) -> None:
    entry = PACKAGED[model]
    assert set(entry) <= {"standard", "flex", "priority", "source"}
    assert "standard" in entry and entry["source"].strip()
    assert TABLE.models[model].source == entry["source"]
    assert TABLE.models[model].effective == "2026-07-30"


def test_flex_prices_are_exactly_the_flex_families() -> None:
    """Every family the proxy sends to flex has a flex price, and no other model claims one (pro models included)."""
    assert TABLE.flex_families == frozenset(FLEX_FAMILIES)
    assert TABLE.families == frozenset(PACKAGED)
    assert TABLE.flex_families < TABLE.families


def test_override_file_adds_and_replaces(tmp_path: Path) -> None:
    override = tmp_path / "prices.json"
    override.write_text(
        json.dumps({
            "effective": "2027-01-01",
            "models": {
                "o3": {"standard": {"input": 3, "output": 9}, "flex": {"input": 1.5, "output": 4.5}},
                "my-model": {
                    "standard": {"input": 0.4, "cached_input": 0.1, "output": 1.6},
                    "flex": {"input": 0.2, "cached_input": 0.05, "output": 0.8},
                    "source": "our contract",
                    "effective": "2026-12-01",
                },
                "o4-mini-2025-04-16": {"standard": {"input": 7, "output": 7}, "flex": {"input": 7, "output": 7}},
                "gpt-9": {"standard": {"input": 1, "output": 2}, "priority": {"input": 2, "output": 4}},
            }
        })
    )  # fmt: skip
    table = PriceTable.load(override)
    o3 = table.resolve("o3-2025-04-16")
    assert o3 is not None
    assert o3.standard == Rates(D("3"), D("3"), D("9"))  # cached_input defaults to the input rate
    assert o3.flex == Rates(D("1.5"), D("1.5"), D("4.5"))
    assert (o3.priority, o3.source, o3.effective) == (None, None, "2027-01-01")  # replaced whole
    mine = table.resolve("my-model-2026-01-01")
    assert mine is not None
    assert (mine.family, mine.standard, mine.flex) == (
        "my-model", Rates(D("0.4"), D("0.1"), D("1.6")), Rates(D("0.2"), D("0.05"), D("0.8")),
    )  # fmt: skip
    assert (mine.source, mine.effective) == ("our contract", "2026-12-01")
    exact = table.resolve("o4-mini-2025-04-16")
    assert exact is not None and exact.family == "o4-mini-2025-04-16"
    family = table.resolve("o4-mini")
    assert family is not None and family.standard == TABLE.models["o4-mini"].standard
    assert table.models["gpt-5"] == TABLE.models["gpt-5"]
    nine = table.resolve("gpt-9")
    assert nine is not None and nine.flex is None
    assert price(nine, Usage(1_000_000, 0, 1_000_000), "priority", sent_flex=True) == Costing(D(6), D(0), D(0))
    assert shadow_savings(nine, Usage(1_000_000, 0, 1_000_000), "default") == 0
    assert table.families == TABLE.families | {"my-model", "o4-mini-2025-04-16", "gpt-9"}
    assert table.flex_families == TABLE.flex_families | {"my-model", "o4-mini-2025-04-16"}
    assert PriceTable.load().models["o3"].standard == O3_STANDARD  # the packaged table is not changed


def test_from_json_without_dates_or_sources() -> None:
    table = PriceTable.from_json({"models": {"m": {"standard": {"input": 1, "output": 1}}}})
    assert table.models["m"] == ModelPrice("m", Rates(D(1), D(1), D(1)))


CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 256, "accepted_prediction_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 64},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 256},
    "total_tokens": 1500,
}


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        pytest.param({"usage": CHAT_USAGE}, Usage(1200, 1024, 300, 256, 0), id="chat"),
        pytest.param(
            {"object": "chat.completion.chunk", "choices": [], "usage": CHAT_USAGE},
            Usage(1200, 1024, 300, 256, 0),
            id="chat-stream-usage-chunk",
        ),
        pytest.param(
            {"usage": {**CHAT_USAGE, "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 50}}},
            Usage(1200, 0, 300, 256, 50),
            id="chat-cache-write",
        ),
        pytest.param(
            {"usage": {**CHAT_USAGE, "prompt_tokens_details": None, "completion_tokens_details": None}},
            Usage(1200, 0, 300, 0, 0),
            id="chat-details-none",
        ),
        pytest.param(
            {"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}},
            Usage(10, 0, 5, 0, 0),
            id="chat-details-missing",
        ),
        pytest.param(
            {"usage": {**CHAT_USAGE, "prompt_tokens_details": {"cached_tokens": None}}},
            Usage(1200, 0, 300, 256, 0),
            id="chat-cached-none",
        ),
        pytest.param({"usage": RESPONSES_USAGE}, Usage(1200, 1024, 300, 256, 64), id="responses"),
        pytest.param(
            {"usage": {**RESPONSES_USAGE, "input_tokens_details": None, "output_tokens_details": None}},
            Usage(1200, 0, 300, 0, 0),
            id="responses-details-none",
        ),
        pytest.param(
            {"usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}},
            Usage(7, 0, 3, 0, 0),
            id="responses-details-missing",
        ),
        pytest.param(
            {"usage": {"input_tokens": None, "output_tokens": None}}, Usage(0, 0, 0, 0, 0), id="responses-none"
        ),
        pytest.param(
            {
                "usage": {
                    "prompt_tokens": True,
                    "completion_tokens": -5,
                    "prompt_tokens_details": {"cached_tokens": 1.5},
                }
            },
            Usage(0, 0, 0, 0, 0),
            id="not-counts",
        ),
        pytest.param({"usage": {"prompt_tokens": "10"}}, Usage(0, 0, 0, 0, 0), id="string-count"),
        pytest.param({"usage": {}}, Usage(0, 0, 0, 0, 0), id="empty-usage"),
        pytest.param({"id": "chatcmpl-1"}, None, id="no-usage"),
        pytest.param({"usage": None}, None, id="usage-null"),
        pytest.param({"usage": [1, 2]}, None, id="usage-not-object"),
    ],
)
def test_usage_from(body: dict[str, Any], usage: Usage | None) -> None:
    assert usage_from(body) == usage
