"""Price an answer from its `usage` and the tier that served it, and what flex saved. Pure: no I/O but loading."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from importlib import resources
from pathlib import Path
from typing import Any

_DATED = re.compile(r"^(?P<family>.+?)-\d{4}-\d{2}-\d{2}$")
_MILLION = Decimal(1_000_000)
_NANO = Decimal(1_000_000_000)
STANDARD_TIERS = frozenset({"default", "auto", "standard"})


@dataclass(frozen=True)
class Rates:
    """USD per 1M tokens."""

    input: Decimal
    cached_input: Decimal
    output: Decimal
    cache_write: Decimal | None = None


@dataclass(frozen=True)
class ModelPrice:
    family: str
    standard: Rates
    flex: Rates | None = None  # None: the model has no flex tier, so flex saves nothing on it
    priority: Rates | None = None  # None: no published priority price, so priority answers stay unpriced
    source: str | None = None
    effective: str | None = None  # the date these prices took effect


@dataclass(slots=True)
class Usage:
    input: int = 0  # all prompt tokens, cached and cache-write ones included
    cached_input: int = 0
    output: int = 0  # reasoning tokens included, as OpenAI bills them
    reasoning: int = 0
    cache_write: int = 0


@dataclass(slots=True)
class Costing:
    cost_usd: Decimal
    saved_usd: Decimal  # standard price minus flex price, for answers served on flex
    lost_usd: Decimal  # what flex would have saved, for answers the proxy sent flex but another tier served


def nano_usd(usd: Decimal) -> int:
    """USD as whole nano-USD (half to even), never below zero: the unit money is summed in, so sums stay exact."""
    return max(0, int((usd * _NANO).to_integral_value(ROUND_HALF_EVEN)))


@functools.lru_cache(maxsize=4096)  # asked several times per request, for a handful of names
def family_of(model: str) -> str:
    """`o3-2025-04-16` → `o3`: dated snapshots are priced as their family."""
    match = _DATED.match(model)
    return match.group("family") if match else model


def _rates(data: Mapping[str, Any]) -> Rates:
    write = data.get("cache_write")
    return Rates(
        Decimal(str(data["input"])),
        Decimal(str(data.get("cached_input", data["input"]))),
        Decimal(str(data["output"])),
        None if write is None else Decimal(str(write)),
    )


def _optional_rates(data: Mapping[str, Any] | None) -> Rates | None:
    return None if data is None else _rates(data)


class PriceTable:
    """Model family → prices; the packaged table, optionally extended or replaced by an operator's file."""

    def __init__(self, models: Mapping[str, ModelPrice]) -> None:
        self.models = dict(models)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PriceTable:
        effective = data.get("effective")
        return cls({
            name: ModelPrice(
                name,
                _rates(entry["standard"]),
                _optional_rates(entry.get("flex")),
                _optional_rates(entry.get("priority")),
                entry.get("source"),
                entry.get("effective", effective),
            )
            for name, entry in data["models"].items()
        })  # fmt: skip

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """The packaged table, with each model in `override` (same format) added or replaced."""
        text = resources.files("proxy").joinpath("prices.json").read_text(encoding="utf-8")
        table = cls.from_json(json.loads(text))
        if override is not None:
            extra = cls.from_json(json.loads(override.read_text(encoding="utf-8")))
            table.models.update(extra.models)
        return table

    @property
    def families(self) -> frozenset[str]:
        """Every priced family: the names a model label may take without growing without bound."""
        return frozenset(self.models)

    @property
    def flex_families(self) -> frozenset[str]:
        """The families with a flex price."""
        return frozenset(name for name, model_price in self.models.items() if model_price.flex is not None)

    def known_families(self, flex_patterns: Iterable[str] = ()) -> frozenset[str]:
        """The families a model label, gate or observation may be kept under: every priced family and every
        flex pattern written without wildcards. Any other name is `other`, so client-chosen names stay bounded."""
        literal = (family_of(p) for p in flex_patterns if p and not any(c in p for c in "*?["))
        return self.families | frozenset(literal)

    def resolve(self, model: str) -> ModelPrice | None:
        return self.models.get(model) or self.models.get(family_of(model))


def usage_from(body: Mapping[str, Any]) -> Usage | None:
    """Read `usage` from a chat completion, a Response or a stream's usage chunk; None when absent."""
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return None
    if "input_tokens" in usage:  # Responses API
        inp, out = usage.get("input_tokens"), usage.get("output_tokens")
        in_details, out_details = usage.get("input_tokens_details"), usage.get("output_tokens_details")
    else:  # Chat Completions
        inp, out = usage.get("prompt_tokens"), usage.get("completion_tokens")
        in_details, out_details = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
    return Usage(
        input=_int(inp),
        cached_input=_int(_field(in_details, "cached_tokens")),
        output=_int(out),
        reasoning=_int(_field(out_details, "reasoning_tokens")),
        cache_write=_int(_field(in_details, "cache_write_tokens")),
    )


def _field(details: Any, name: str) -> Any:
    return details.get(name) if isinstance(details, Mapping) else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def cost(rates: Rates, usage: Usage) -> Decimal:
    cached = min(usage.cached_input, usage.input)
    written = min(usage.cache_write, usage.input - cached) if rates.cache_write is not None else 0
    plain = usage.input - cached - written
    total = plain * rates.input + cached * rates.cached_input + usage.output * rates.output
    if rates.cache_write is not None:
        total += written * rates.cache_write
    return total / _MILLION


def tier_rates(model_price: ModelPrice, served_tier: str | None) -> Rates | None:
    """The rates of the tier a response reports; None when that tier has no price here (scale, ultrafast, ...)."""
    if served_tier is None or served_tier in STANDARD_TIERS:
        return model_price.standard
    if served_tier == "flex":
        return model_price.flex
    if served_tier == "priority":
        return model_price.priority
    return None


def price(model_price: ModelPrice, usage: Usage, served_tier: str | None, *, sent_flex: bool) -> Costing | None:
    """Cost at the served tier, and what flex saved (served on flex) or lost (sent flex, served on another tier).

    None when the served tier has no price for this model. A model without a flex price saves and loses nothing.
    """
    rates = tier_rates(model_price, served_tier)
    if rates is None:
        return None
    spent = cost(rates, usage)
    zero = Decimal(0)
    if model_price.flex is None:
        return Costing(spent, zero, zero)
    if served_tier == "flex":
        return Costing(spent, cost(model_price.standard, usage) - spent, zero)
    return Costing(spent, zero, spent - cost(model_price.flex, usage) if sent_flex else zero)


def shadow_savings(model_price: ModelPrice, usage: Usage, served_tier: str | None) -> Decimal:
    """What flex would have saved on an answer served as it came (shadow mode): its cost at the served tier minus
    its cost on flex. Zero when the model has no flex price, when flex served it, or when the served tier has no
    price here (nothing known to compare with)."""
    if model_price.flex is None or served_tier == "flex":
        return Decimal(0)
    rates = tier_rates(model_price, served_tier)
    if rates is None:
        return Decimal(0)
    return cost(rates, usage) - cost(model_price.flex, usage)
