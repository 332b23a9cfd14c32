"""How much of each scenario to run: the full benchmark, or the quick harness self-check."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SMALL_CHAT_BODY = '{"model":"o3","messages":[{"role":"user","content":"hi"}]}'
CHAT_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer x"}  # the simulator takes any key


@dataclass(frozen=True)
class Plan:
    quick: bool = False
    # 1. overhead (wrk)
    wrk_duration_s: float = 10.0
    wrk_warmup_s: float = 2.0
    wrk_connections: tuple[tuple[int, int], ...] = ((1, 1), (2, 32))  # (threads, connections)
    wrk_rounds: int = 4  # every target at every level once a round; figures are means over the rounds
    gate_pairs: int = 8  # extra back-to-back runs, gate on and gate off, at 32 connections
    gate_pair_s: float = 5.0
    # 2. held connections
    held_requests: int = 8000
    held_fallbacks: tuple[int, ...] = (6000, 4000, 2000, 1000)  # tried in turn if a level fails
    held_latency_s: float = 20.0
    held_ramp_per_s: float = 4000.0  # new requests a second while the client opens them
    # 3. large bodies
    body_sizes_mb: tuple[int, ...] = (1, 10)
    body_requests: int = 30
    body_warmup: int = 3
    # 4. streams
    stream_events: int = 200
    stream_interval_s: float = 0.005
    stream_runs: int = 10  # per target, alternating direct and proxied
    # 5. scarce flex (issue 9): flex busy for the first busy_for_s of every busy_period_s; open-loop arrivals
    scarce_requests: int = 300
    scarce_rate_per_s: float = 10.0
    scarce_busy_period_s: float = 10.0
    scarce_busy_for_s: float = 3.0
    scarce_latency_standard_s: float = 0.2
    scarce_latency_flex_s: float = 0.3
    scarce_timeouts_s: tuple[float, ...] = (600.0, 60.0)  # the SDK's timeout= (its default, and a short one)
    # Proxy settings for extra rows labelled "tuned: ...": a busy gate probing at least every 0.5 s, not 1 s.
    scarce_tuned: tuple[dict[str, object], ...] = ({"gate_probe_max_s": 0.25},)
    scarce_sensitivity: tuple[float, ...] = (0.6,)  # flex latencies for extra rows: gate on, defaults, 1st timeout

    @classmethod
    def full(cls) -> Plan:
        return cls()

    @classmethod
    def quick_check(cls) -> Plan:
        """Every scenario, small enough to finish well inside 90 s; the figures only prove the harness."""
        return cls(
            quick=True,
            wrk_duration_s=1.0,
            wrk_warmup_s=1.0,
            wrk_rounds=1,
            gate_pairs=2,
            gate_pair_s=1.0,
            held_requests=1000,
            held_fallbacks=(),
            held_latency_s=3.0,
            body_requests=5,
            body_warmup=1,
            stream_runs=2,
            scarce_requests=40,
            scarce_rate_per_s=20.0,
            scarce_busy_period_s=1.0,
            scarce_busy_for_s=0.3,
            scarce_latency_standard_s=0.05,
            scarce_latency_flex_s=0.05,
            scarce_tuned=(),
            scarce_sensitivity=(),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
