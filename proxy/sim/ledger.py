"""What the simulated upstream would bill: accepted versus refused work, and the usage it delivered in full.

Billing model (shared OpenAI reference, section 9): a 429 of any kind, another error answer, a connect
failure or a connection reset before the request was accepted is not billed; work upstream accepted is
assumed billed in full, even when the client never sees its usage (a hang, a cut stream, a client that
left). The simulator accepts work when it starts generating: a 200 answer, a hang or stall, a reset or drop
after a silence (`Reply.accepts_work`). An in-band flex error on a 200 stream is a refusal, like its 429.
So for a proxy's cost metrics: `delivered_tokens` is what it can have read; `accepted_tokens` is the bill.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .payloads import Usage

TOKEN_KINDS = ("input", "cached", "output", "reasoning")


@dataclass
class Billing:
    """Counts since the last reset; `*_tokens` map the served tier to input, cached, output, reasoning tokens.

    accepted: requests whose work started (billed). refused: model requests answered without work (free).
    delivered: accepted answers whose usage the simulator sent in full (body or usage event written).
    """

    accepted: int = 0
    refused: int = 0
    delivered: int = 0
    accepted_tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    delivered_tokens: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def undelivered(self) -> int:
        """Accepted work whose usage never reached the client: billed, yet invisible to it."""
        return self.accepted - self.delivered

    def add_accepted(self, tier: str, usage: Usage) -> None:
        self.accepted += 1
        _add(self.accepted_tokens, tier, usage)

    def add_delivered(self, tier: str, usage: Usage) -> None:
        self.delivered += 1
        _add(self.delivered_tokens, tier, usage)

    def snapshot(self) -> Billing:
        return copy.deepcopy(self)


def _add(totals: dict[str, dict[str, int]], tier: str, usage: Usage) -> None:
    counts = totals.setdefault(tier, dict.fromkeys(TOKEN_KINDS, 0))
    for kind in TOKEN_KINDS:
        counts[kind] += getattr(usage, kind)
