"""Decide which tier a model request goes out on, and why. Pure: no I/O."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ClientError

FLEX = "flex"


@dataclass(slots=True)
class TierDecision:
    tier: str | None  # the service_tier sent upstream (None: the body carries none)
    managed: bool  # the proxy chose this tier, so it may drop it if upstream rejects it (fallback applies to any flex)
    reason: str  # injected | forced | client | header_off | policy | not_eligible | background | override | no_model

    @property
    def on_flex(self) -> bool:
        return self.tier == FLEX


def header_mode(value: str | None) -> str | None:
    """X-Flex-Tier: `off` disables injection, `flex` forces it; anything else is a client error."""
    if value is None:
        return None
    mode = value.strip().lower()
    if mode not in ("off", "flex"):
        raise ClientError("X-Flex-Tier must be 'off' or 'flex'.", param="X-Flex-Tier", code="invalid_header")
    return mode


def is_flex_model(model: Any, patterns: tuple[str, ...]) -> bool:
    return isinstance(model, str) and _matcher(patterns)(model) is not None


@functools.lru_cache(maxsize=8)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """All the glob patterns as one compiled regex: one match per request instead of one per pattern."""
    if not patterns:
        return lambda model: None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


def decide(
    *,
    model: Any,
    client_tier: Any,
    background: bool,
    header: str | None,
    patterns: tuple[str, ...],
    override_client_tier: bool,
    inject_background: bool,
    policy_flex: bool = True,
) -> TierDecision:
    """The tier to send and whether the proxy owns it; a client's own tier wins unless overridden."""
    sent = client_tier if isinstance(client_tier, str) else None
    if header == "off":
        return TierDecision(sent, False, "header_off")
    if header == "flex":
        return TierDecision(FLEX, True, "forced")
    if not policy_flex:
        return TierDecision(sent, False, "policy")
    if sent is not None and not override_client_tier:
        return TierDecision(sent, False, "client")
    if not isinstance(model, str):
        return TierDecision(sent, False, "no_model")
    if not is_flex_model(model, patterns):
        return TierDecision(sent, False, "not_eligible")
    if background and not inject_background:
        return TierDecision(sent, False, "background")
    return TierDecision(FLEX, True, "override" if sent is not None else "injected")
