"""How much of each scenario to run: the full benchmark, or the quick harness self-check."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

SMALL_CHAT_BODY = '{"model":"o3","messages":[{"role":"user","content":"hi"}]}'
CHAT_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer x"}  # the simulator takes any key


@dataclass(frozen=True)
class Workload:
    """One flex workload: the simulator's busy pattern and latencies, and how the clients send.

    `clients` > 0 is a closed loop: that many clients, each sending its share of `requests` one after another
    (the next when the previous answer arrives). `clients` == 0 is an open loop: one request every
    1/`rate_per_s` s whatever the answers do. Flex is refused for the first `busy_for_s` of every
    `busy_period_s`, counted from a reset of the simulator right before the first request.
    """

    name: str
    clients: int
    requests: int
    busy_period_s: float
    busy_for_s: float
    latency_flex_s: float
    latency_standard_s: float
    timeouts_s: tuple[float, ...]  # the SDK's timeout=, one set of rows each
    rate_per_s: float = 0.0

    @property
    def per_client(self) -> int:
        return self.requests // self.clients if self.clients else self.requests


# Issue 14's workloads. The open loop is issue 9's, with flex answering in 0.5 s like the others (issue 9 had 0.3 s).
SEQUENTIAL = Workload("sequential", 1, 100, 10.0, 3.0, 0.5, 0.2, (600.0, 60.0))
FOUR_CLIENTS = Workload("four-clients", 4, 200, 10.0, 3.0, 0.5, 0.2, (600.0, 60.0))
OPEN_LOOP = Workload("open-loop", 0, 300, 10.0, 3.0, 0.5, 0.2, (600.0, 60.0), rate_per_s=10.0)
LONG_BUSY = Workload("long-busy", 0, 600, 40.0, 20.0, 3.0, 1.0, (60.0,), rate_per_s=10.0)
WORKLOAD_NAMES = tuple(w.name for w in (SEQUENTIAL, FOUR_CLIENTS, OPEN_LOOP, LONG_BUSY))
# The quick plan's: the same shapes, short, each at one timeout (the long busy spells keep their 60 s, the others
# take the SDK's default). Busy parts still come round more than once, so the gate has work.
QUICK_WORKLOADS = (
    replace(SEQUENTIAL, requests=16, busy_period_s=1.0, busy_for_s=0.3, latency_flex_s=0.05, latency_standard_s=0.02,
            timeouts_s=(600.0,)),
    replace(FOUR_CLIENTS, requests=32, busy_period_s=1.0, busy_for_s=0.3, latency_flex_s=0.05,
            latency_standard_s=0.02, timeouts_s=(600.0,)),
    replace(OPEN_LOOP, requests=30, rate_per_s=20.0, busy_period_s=1.0, busy_for_s=0.3, latency_flex_s=0.05,
            latency_standard_s=0.02, timeouts_s=(600.0,)),
    replace(LONG_BUSY, requests=30, rate_per_s=20.0, busy_period_s=1.2, busy_for_s=0.6, latency_flex_s=0.1,
            latency_standard_s=0.04),
)  # fmt: skip


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
    # 5. scarce flex (issues 9 and 14): the workloads below, each with the gate on and off at every timeout
    workloads: tuple[Workload, ...] = (SEQUENTIAL, FOUR_CLIENTS, OPEN_LOOP, LONG_BUSY)
    # 6. a fleet (issue 15): this many proxy processes in front of one simulator, with and without Redis, on these
    # workloads at each one's first timeout; then the open path with Redis configured or not, paired wrk runs
    fleet_sizes: tuple[int, ...] = (1, 4, 8)
    fleet_workloads: tuple[str, ...] = ("open-loop", "long-busy")
    state_pairs: int = 12
    state_pair_s: float = 4.0
    # Run only the workloads named here (empty: all); `python -m bench --workload NAME`.
    only_workloads: tuple[str, ...] = ()

    @classmethod
    def full(cls) -> Plan:
        return cls()

    @classmethod
    def quick_check(cls) -> Plan:
        """Every scenario, small enough to finish in about two minutes; the figures only prove the harness."""
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
            workloads=QUICK_WORKLOADS,
            fleet_sizes=(1, 2),
            state_pairs=2,
            state_pair_s=1.0,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def chosen(self, names: Iterable[str]) -> list[Workload]:
        """The plan's workloads among `names`, less any that `only_workloads` leaves out."""
        wanted = set(names)
        return [w for w in self.workloads if w.name in wanted and (not self.only_workloads
                                                                    or w.name in self.only_workloads)]  # fmt: skip

    def workload(self, name: str) -> Workload:
        return next(w for w in self.workloads if w.name == name)
