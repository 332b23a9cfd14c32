"""proxy.pricing: usage x rates of the served tier, and what flex saved or would have saved."""

from __future__ import annotations

import json
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from proxy.config import FLEX_FAMILIES
from proxy.pricing import Costing, PriceTable, Rates, Usage, cost, family_of, price, usage_from

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
        ("priority", True, None),
        ("priority", False, None),
        ("scale", False, None),
        ("ultrafast", False, None),
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
    ],
)  # fmt: skip
def test_price(model: str, usage: Usage, served: str, expected: Costing) -> None:
    model_price = TABLE.resolve(model)
    assert model_price is not None
    assert price(model_price, usage, served, sent_flex=False) == expected


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
        ("o3-mini", None),
        ("o3-mini-2025-01-31", None),
        ("o3-pro", None),
        ("gpt-4o", None),
        ("gpt-4o-2024-08-06", None),
        ("gpt-5.4-pro", None),
        ("o3-2025-04", None),
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


# Rates from shared/reference/openai-api.md §4 (USD per 1M tokens).
@pytest.mark.parametrize(
    ("model", "standard", "flex"),
    [
        ("o3", Rates(D("2.00"), D("0.50"), D("8.00")), Rates(D("1.00"), D("0.25"), D("4.00"))),
        ("o4-mini", Rates(D("1.10"), D("0.275"), D("4.40")), Rates(D("0.55"), D("0.1375"), D("2.20"))),
        ("gpt-5", Rates(D("1.25"), D("0.125"), D("10.00")), Rates(D("0.625"), D("0.0625"), D("5.00"))),
        ("gpt-5-nano", Rates(D("0.05"), D("0.005"), D("0.40")), Rates(D("0.025"), D("0.0025"), D("0.20"))),
        (
            "gpt-5.6-sol",
            Rates(D("5.00"), D("0.50"), D("30.00"), D("6.25")),
            Rates(D("2.50"), D("0.25"), D("15.00"), D("3.125")),
        ),
    ],
)
def test_packaged_rates(model: str, standard: Rates, flex: Rates) -> None:
    model_price = TABLE.models[model]
    assert (model_price.standard, model_price.flex) == (standard, flex)


@pytest.mark.parametrize("model", sorted(PACKAGED))
def test_packaged_flex_is_half_of_standard(model: str) -> None:
    entry = PACKAGED[model]
    for field in ("input", "cached_input", "output", "cache_write"):
        assert (field in entry["standard"]) == (field in entry["flex"])
        if field in entry["standard"]:
            assert abs(entry["flex"][field] - entry["standard"][field] / 2) <= 1e-9, field


def test_every_flex_family_has_a_price() -> None:
    assert sorted(set(FLEX_FAMILIES) - set(TABLE.models)) == []


def test_override_file_adds_and_replaces(tmp_path: Path) -> None:
    override = tmp_path / "prices.json"
    override.write_text(
        json.dumps({
            "models": {
                "o3": {"standard": {"input": 3, "output": 9}, "flex": {"input": 1.5, "output": 4.5}},
                "my-model": {
                    "standard": {"input": 0.4, "cached_input": 0.1, "output": 1.6},
                    "flex": {"input": 0.2, "cached_input": 0.05, "output": 0.8},
                },
                "o4-mini-2025-04-16": {"standard": {"input": 7, "output": 7}, "flex": {"input": 7, "output": 7}},
            }
        })
    )  # fmt: skip
    table = PriceTable.load(override)
    o3 = table.resolve("o3-2025-04-16")
    assert o3 is not None
    assert o3.standard == Rates(D("3"), D("3"), D("9"))  # cached_input defaults to the input rate
    assert o3.flex == Rates(D("1.5"), D("1.5"), D("4.5"))
    mine = table.resolve("my-model-2026-01-01")
    assert mine is not None
    assert (mine.family, mine.standard, mine.flex) == (
        "my-model", Rates(D("0.4"), D("0.1"), D("1.6")), Rates(D("0.2"), D("0.05"), D("0.8")),
    )  # fmt: skip
    exact = table.resolve("o4-mini-2025-04-16")
    assert exact is not None and exact.family == "o4-mini-2025-04-16"
    family = table.resolve("o4-mini")
    assert family is not None and family.standard == TABLE.models["o4-mini"].standard
    assert table.models["gpt-5"] == TABLE.models["gpt-5"]
    assert PriceTable.load().models["o3"].standard == O3_STANDARD  # the packaged table is not changed


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
