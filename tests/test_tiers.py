"""proxy.tiers: which tier a request goes out on, whether the proxy owns that choice, and why."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from proxy.config import DEFAULT_FLEX_MODELS
from proxy.errors import ClientError
from proxy.tiers import TierDecision, decide, header_mode, is_flex_model

ELIGIBLE, INELIGIBLE = "o3", "gpt-4.1"
CLIENT_TIERS = (None, "auto", "priority", "flex")


def _decide(
    header: str | None,
    client: Any,
    model: Any,
    background: bool,
    override: bool,
    inject_background: bool = False,
) -> TierDecision:
    return decide(
        model=model,
        client_tier=client,
        background=background,
        header=header,
        patterns=DEFAULT_FLEX_MODELS,
        override_client_tier=override,
        inject_background=inject_background,
    )


# header None: client tier x eligible x background x override, every row written out.
NO_HEADER = [
    # client, model, background, override -> tier, managed, reason
    (None, ELIGIBLE, False, False, "flex", True, "injected"),
    (None, ELIGIBLE, False, True, "flex", True, "injected"),
    (None, ELIGIBLE, True, False, None, False, "background"),
    (None, ELIGIBLE, True, True, None, False, "background"),
    (None, INELIGIBLE, False, False, None, False, "not_eligible"),
    (None, INELIGIBLE, False, True, None, False, "not_eligible"),
    (None, INELIGIBLE, True, False, None, False, "not_eligible"),
    (None, INELIGIBLE, True, True, None, False, "not_eligible"),
    ("auto", ELIGIBLE, False, False, "auto", False, "client"),
    ("auto", ELIGIBLE, False, True, "flex", True, "override"),
    ("auto", ELIGIBLE, True, False, "auto", False, "client"),
    ("auto", ELIGIBLE, True, True, "auto", False, "background"),
    ("auto", INELIGIBLE, False, False, "auto", False, "client"),
    ("auto", INELIGIBLE, False, True, "auto", False, "not_eligible"),
    ("auto", INELIGIBLE, True, False, "auto", False, "client"),
    ("auto", INELIGIBLE, True, True, "auto", False, "not_eligible"),
    ("priority", ELIGIBLE, False, False, "priority", False, "client"),
    ("priority", ELIGIBLE, False, True, "flex", True, "override"),
    ("priority", ELIGIBLE, True, False, "priority", False, "client"),
    ("priority", ELIGIBLE, True, True, "priority", False, "background"),
    ("priority", INELIGIBLE, False, False, "priority", False, "client"),
    ("priority", INELIGIBLE, False, True, "priority", False, "not_eligible"),
    ("priority", INELIGIBLE, True, False, "priority", False, "client"),
    ("priority", INELIGIBLE, True, True, "priority", False, "not_eligible"),
    ("flex", ELIGIBLE, False, False, "flex", False, "client"),
    ("flex", ELIGIBLE, False, True, "flex", True, "override"),
    ("flex", ELIGIBLE, True, False, "flex", False, "client"),
    ("flex", ELIGIBLE, True, True, "flex", False, "background"),
    ("flex", INELIGIBLE, False, False, "flex", False, "client"),
    ("flex", INELIGIBLE, False, True, "flex", False, "not_eligible"),
    ("flex", INELIGIBLE, True, False, "flex", False, "client"),
    ("flex", INELIGIBLE, True, True, "flex", False, "not_eligible"),
]


@pytest.mark.parametrize(("client", "model", "background", "override", "tier", "managed", "reason"), NO_HEADER)
def test_no_header(
    client: str | None, model: str, background: bool, override: bool, tier: str | None, managed: bool, reason: str
) -> None:
    assert _decide(None, client, model, background, override) == TierDecision(tier, managed, reason)


COMBINATIONS = list(itertools.product(CLIENT_TIERS, (ELIGIBLE, INELIGIBLE), (False, True), (False, True)))


@pytest.mark.parametrize(("client", "model", "background", "override"), COMBINATIONS)
def test_header_off_sends_the_clients_tier_untouched(
    client: str | None, model: str, background: bool, override: bool
) -> None:
    assert _decide("off", client, model, background, override) == TierDecision(client, False, "header_off")


@pytest.mark.parametrize(("client", "model", "background", "override"), COMBINATIONS)
def test_header_flex_forces_flex(client: str | None, model: str, background: bool, override: bool) -> None:
    assert _decide("flex", client, model, background, override) == TierDecision("flex", True, "forced")


@pytest.mark.parametrize(
    ("header", "client", "model", "background", "override", "inject_background", "expected"),
    [
        (None, None, ELIGIBLE, True, False, True, TierDecision("flex", True, "injected")),
        (None, "auto", ELIGIBLE, True, True, True, TierDecision("flex", True, "override")),
        (None, "auto", ELIGIBLE, True, False, True, TierDecision("auto", False, "client")),
        (None, None, INELIGIBLE, True, False, True, TierDecision(None, False, "not_eligible")),
        (None, None, None, False, False, False, TierDecision(None, False, "no_model")),
        (None, None, 5, False, False, False, TierDecision(None, False, "no_model")),
        (None, "auto", ["o3"], False, True, False, TierDecision("auto", False, "no_model")),
        (None, "auto", None, False, False, False, TierDecision("auto", False, "client")),
        (None, 5, ELIGIBLE, False, False, False, TierDecision("flex", True, "injected")),
        (None, {"tier": "auto"}, ELIGIBLE, False, False, False, TierDecision("flex", True, "injected")),
        (None, None, "o3-2025-04-16", False, False, False, TierDecision("flex", True, "injected")),
        ("flex", None, None, False, False, False, TierDecision("flex", True, "forced")),
        ("off", 5, ELIGIBLE, False, False, False, TierDecision(None, False, "header_off")),
    ],
)
def test_edges(
    header: str | None,
    client: Any,
    model: Any,
    background: bool,
    override: bool,
    inject_background: bool,
    expected: TierDecision,
) -> None:
    assert _decide(header, client, model, background, override, inject_background) == expected


@pytest.mark.parametrize(
    ("tier", "on_flex"), [("flex", True), (None, False), ("auto", False), ("priority", False), ("Flex", False)]
)
def test_on_flex(tier: str | None, on_flex: bool) -> None:
    assert TierDecision(tier, False, "client").on_flex is on_flex


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, None), ("off", "off"), ("OFF", "off"), (" Off ", "off"), ("flex", "flex"), (" FLEX\t", "flex")],
)
def test_header_mode(value: str | None, mode: str | None) -> None:
    assert header_mode(value) == mode


@pytest.mark.parametrize("value", ["", " ", "on", "auto", "standard", "flex,off", "true"])
def test_header_mode_rejects(value: str) -> None:
    with pytest.raises(ClientError) as info:
        header_mode(value)
    assert (info.value.status, info.value.param, info.value.code) == (400, "X-Flex-Tier", "invalid_header")
    assert info.value.message == "X-Flex-Tier must be 'off' or 'flex'."


@pytest.mark.parametrize(
    ("model", "eligible"),
    [
        ("o3", True),
        ("o3-2025-04-16", True),
        ("o4-mini", True),
        ("o4-mini-2025-04-16", True),
        ("gpt-5", True),
        ("gpt-5-2025-08-07", True),
        ("gpt-5-mini", True),
        ("gpt-5-mini-2025-08-07", True),
        ("gpt-5-nano", True),
        ("gpt-5.1", True),
        ("gpt-5.2", True),
        ("gpt-5.4", True),
        ("gpt-5.4-mini", True),
        ("gpt-5.4-nano", True),
        ("gpt-5.5", True),
        ("gpt-5.6-sol", True),
        ("gpt-5.6-terra", True),
        ("gpt-5.6-luna", True),
        ("gpt-4.1", False),
        ("gpt-4o", False),
        ("gpt-4o-mini", False),
        ("o3-mini", False),
        ("o3-mini-2025-01-31", False),
        ("o3-pro", False),
        ("o3-deep-research", False),
        ("o4-mini-deep-research", False),
        ("gpt-5.4-pro", False),
        ("gpt-5.5-pro", False),
        ("gpt-5-chat-latest", False),
        ("gpt-5-codex", False),
        ("O3", False),
        ("o3 ", False),
        ("o3-2025-04-16-preview", False),
        ("o3-25-04-16", False),
        ("gpt-5x", False),
        ("", False),
        (None, False),
        (3, False),
        (["o3"], False),
        ({"model": "o3"}, False),
    ],
)
def test_default_patterns(model: Any, eligible: bool) -> None:
    assert is_flex_model(model, DEFAULT_FLEX_MODELS) is eligible


@pytest.mark.parametrize(
    ("model", "patterns", "eligible"),
    [
        ("o3", (), False),
        ("my-o3-finetune", ("*o3*",), True),
        ("gpt-5.4-pro", ("gpt-5.4*",), True),
        ("gpt-5.4-pro", ("gpt-5.4",), False),
        ("GPT-5", ("gpt-5",), False),
    ],
)
def test_custom_patterns(model: str, patterns: tuple[str, ...], eligible: bool) -> None:
    assert is_flex_model(model, patterns) is eligible
