"""One request as the simulated upstream received it, and what became of it."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .ledger import Billing
from .payloads import Usage


@dataclass(eq=False)
class RecordedRequest:
    """One request as the simulator received it; the rest is filled in while it is answered.

    `finished` is set when the simulator has done all it was scripted to do (sent the whole answer, or cut,
    reset or dropped the connection itself); `closed_by_peer` when the client closed the connection first
    (its time in `ended_at`); `ended` after either. `accepted` says whether the work was billed (see ledger),
    `usage` and `usage_tier` what it was billed as, `delivered` whether that usage was sent in full.
    Times are `time.monotonic()`.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    outcome: str = ""
    served_tier: str | None = None
    received_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    accepted: bool | None = None
    usage: Usage | None = None
    usage_tier: str | None = None
    delivered: bool = False
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    closed_by_peer: threading.Event = field(default_factory=threading.Event, repr=False)
    ended: threading.Event = field(default_factory=threading.Event, repr=False)
    # The billing ledger current when the work was accepted: a delivery after a reset counts in the old one.
    ledger: Billing | None = field(default=None, init=False, repr=False)

    @property
    def outside_v1(self) -> bool:
        """Whether this path, decoded and with its dot segments resolved, falls outside /v1/ (see leaves_v1)."""
        return leaves_v1(self.path)

    @property
    def tier(self) -> str | None:
        """The body's `service_tier`, if it has one."""
        value = self.json.get("service_tier") if isinstance(self.json, dict) else None
        return value if isinstance(value, str) else None

    @property
    def model(self) -> str | None:
        value = self.json.get("model") if isinstance(self.json, dict) else None
        return value if isinstance(value, str) else None

    @property
    def stream(self) -> bool:
        return isinstance(self.json, dict) and self.json.get("stream") is True

    def summary(self) -> dict[str, Any]:
        """The request without its body and with authorization redacted, for /_sim/requests."""
        headers = {k: ("present" if k == "authorization" else v) for k, v in self.headers.items()}
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body_bytes": len(self.body),
            "model": self.model,
            "tier": self.tier,
            "stream": self.stream,
            "outcome": self.outcome,
            "served_tier": self.served_tier,
            "accepted": self.accepted,
            "delivered": self.delivered,
            "finished": self.finished.is_set(),
            "closed_by_peer": self.closed_by_peer.is_set(),
        }


def parse_json(body: bytes) -> Any | None:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def leaves_v1(raw_path: str) -> bool:
    """Whether `raw_path` is outside /v1/ once escapes are decoded, `\\` read as `/` and dot segments resolved.

    Deliberately strict: an empty segment before `v1` (`//v1/x`) counts as outside too.
    """
    segments: list[str] = []
    for segment in urllib.parse.unquote(raw_path).replace("\\", "/").split("/")[1:]:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    return len(segments) < 2 or segments[0] != "v1"
